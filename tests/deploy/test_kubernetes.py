"""deploy/kubernetes (kustomize): renders, validates against the Kubernetes schemas, and agrees with
itself and with Lorry (DESIGN §8, §11): grace period beyond the shutdown deadline, one engine entry
per StatefulSet pod, the adapter store shared read-only, Postgres by reference, wildcard Ingress."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from lorry.engine_spec import static_engines
from lorry.settings import LorrySettings
from tests.deploy import support

# Oldest and newest Kubernetes versions the manifests are validated for (schemas shipped by the
# kubernetes-validate dev dependency).
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
VLLM_LORA_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}

Object = dict[str, Any]


@pytest.fixture(scope="module")
def objects() -> list[Object]:
    kubectl = support.require_binary("kubectl")
    return support.kustomize_render(kubectl)


def one(objects: list[Object], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def configmaps(objects: list[Object]) -> dict[str, Object]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}


def pod_spec(workload: Object) -> Object:
    spec: Object = workload["spec"]["template"]["spec"]
    return spec


def containers(objects: list[Object]) -> Iterator[tuple[Object, Object]]:
    for workload in objects:
        if workload["kind"] in ("Deployment", "StatefulSet", "Job"):
            for container in pod_spec(workload)["containers"]:
                yield workload, container


def container_env(objects: list[Object], container: Object) -> dict[str, str]:
    """The variables a container sees from ConfigMaps (envFrom) and literal `env` (which wins)."""
    maps = configmaps(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= maps[source["configMapRef"]["name"]]["data"]
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> LorrySettings:
    for name in list(os.environ):
        if name.startswith("LORRY_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return LorrySettings()


def lorry_containers(objects: list[Object]) -> list[tuple[Object, Object]]:
    return [(w, c) for w, c in containers(objects) if c["image"].split(":")[0].endswith("/lorry")]


def test_renders_and_validates(objects: list[Object]) -> None:
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        {
            "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Job", "Namespace",
            "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "StatefulSet",
        }
    )  # fmt: skip
    for version in KUBERNETES_VERSIONS:
        for item in objects:
            try:
                kubernetes_validate.validate(item, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{item['kind']}/{item['metadata']['name']} (Kubernetes {version}): {exc}")


def test_validation_is_sharp(objects: list[Object]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(one(objects, "Deployment", "lorry-gateway")))
    pod_spec(broken)["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_everything_lands_in_one_namespace(objects: list[Object]) -> None:
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"lorry"}


# -- the gateway -------------------------------------------------------------------------------------


def test_gateway_grace_period_exceeds_its_shutdown_deadline(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = one(objects, "Deployment", "lorry-gateway")
    (container,) = pod_spec(gateway)["containers"]
    deadline = settings_from(container_env(objects, container), monkeypatch).shutdown_deadline_s
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod_spec(gateway)["terminationGracePeriodSeconds"]
    assert grace > pause + deadline, (
        f"terminationGracePeriodSeconds {grace} must exceed preStop {pause}s "
        f"+ LORRY_SHUTDOWN_DEADLINE_S {deadline}s"
    )


def test_gateway_scales_and_stays_available(objects: list[Object]) -> None:
    gateway = one(objects, "Deployment", "lorry-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    hpa = one(objects, "HorizontalPodAutoscaler", "lorry-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "lorry-gateway",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    (container,) = pod_spec(gateway)["containers"]
    assert container["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
    pdb = one(objects, "PodDisruptionBudget", "lorry-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a PDB that blocks every drain"
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gateway_probes_use_the_operations_port(objects: list[Object]) -> None:
    (container,) = pod_spec(one(objects, "Deployment", "lorry-gateway"))["containers"]
    flags = support.flag_values(container["command"])
    ports = {port["name"]: str(port["containerPort"]) for port in container["ports"]}
    assert ports == {"http": flags["--port"], "ops": flags["--ops-port"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}


# -- Lorry processes ---------------------------------------------------------------------------------


def test_lorry_commands_are_real_cli_commands(objects: list[Object]) -> None:
    commands = {w["metadata"]["name"]: c["command"] for w, c in lorry_containers(objects)}
    assert set(commands) == {"lorry-gateway", "lorry-control-plane", "lorry-migrate"}
    assert commands["lorry-migrate"] == ["lorry", "migrate"]
    for argv in commands.values():
        support.check_cli_argv(argv)


def test_settings_are_lorry_settings_and_database_is_by_reference(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {f"LORRY_{name.upper()}" for name in LorrySettings.model_fields}
    assert not [o for o in objects if o["kind"] == "Secret"], (
        "no secret is rendered: Postgres is by reference"
    )
    for workload, container in lorry_containers(objects):
        env = container_env(objects, container)
        assert {key for key in env if key.startswith("LORRY_")} <= fields
        assert "LORRY_DATABASE_URL" not in env, "the database URL lives in a Secret"
        secrets = [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
        assert secrets == ["lorry-database"], workload["metadata"]["name"]
        static_engines(settings_from(env, monkeypatch))
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert pod_spec(workload)["securityContext"]["runAsNonRoot"] is True


def test_control_plane_writes_the_shared_adapter_store(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    control = one(objects, "Deployment", "lorry-control-plane")
    (container,) = pod_spec(control)["containers"]
    store = settings_from(container_env(objects, container), monkeypatch).adapter_store.as_posix()
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == store]
    assert not mount.get("readOnly")
    volume = next(v for v in pod_spec(control)["volumes"] if v["name"] == mount["name"])
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "engines on other nodes read the store"


def test_services_select_their_pods(objects: list[Object]) -> None:
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matches = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in pod_spec(matches[0])["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port['targetPort']}"


# -- engines -----------------------------------------------------------------------------------------


def test_every_engine_pod_is_its_own_engine_entry(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine_set = one(objects, "StatefulSet", "lorry-engine")
    headless = one(objects, "Service", engine_set["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (gateway_container,) = pod_spec(one(objects, "Deployment", "lorry-gateway"))["containers"]
    engines = static_engines(settings_from(container_env(objects, gateway_container), monkeypatch))
    replicas = engine_set["spec"]["replicas"]
    name, service = engine_set["metadata"]["name"], headless["metadata"]["name"]
    port = str(headless["spec"]["ports"][0]["port"])
    assert sorted(e.url for e in engines) == sorted(
        f"http://{name}-{i}.{service}:{port}" for i in range(replicas)
    )
    (vllm,) = pod_spec(engine_set)["containers"]
    args = vllm["args"]
    flags = support.flag_values(args)
    env = {item["name"]: item.get("value") for item in vllm["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert "--enable-lora" in flags and flags["--port"] == port
    for engine in engines:
        assert args[0] == engine.base_model
        assert flags.get("--served-model-name", args[0]) == engine.served_model_name
        assert int(flags["--max-loras"]) == engine.max_loras
        assert int(flags["--max-cpu-loras"]) == engine.max_cpu_loras
        assert int(flags["--max-lora-rank"]) == engine.max_lora_rank in VLLM_LORA_RANKS
        (mount,) = [m for m in vllm["volumeMounts"] if m["mountPath"] == engine.adapter_root]
        assert mount["readOnly"] is True
        volume = next(v for v in pod_spec(engine_set)["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "lorry-adapters"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_only_gateways_reach_the_engines(objects: list[Object]) -> None:
    engine_labels = one(objects, "StatefulSet", "lorry-engine")["spec"]["template"]["metadata"]["labels"]
    gateway_labels = one(objects, "Deployment", "lorry-gateway")["spec"]["template"]["metadata"]["labels"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (policy,) = [
        p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= engine_labels.items()
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    (local,) = [peer for peer in sources if "namespaceSelector" not in peer]
    selector = local["podSelector"]["matchLabels"]
    assert selector.items() <= gateway_labels.items() and selector["app.kubernetes.io/component"] == "gateway"
    for peer in sources:
        if "namespaceSelector" in peer:  # only a Prometheus, never every pod of every namespace
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


# -- ingress -----------------------------------------------------------------------------------------


def test_wildcard_ingress_routes_and_streams(objects: list[Object], monkeypatch: pytest.MonkeyPatch) -> None:
    (gateway_container,) = pod_spec(one(objects, "Deployment", "lorry-gateway"))["containers"]
    settings = settings_from(container_env(objects, gateway_container), monkeypatch)
    ingresses = [o for o in objects if o["kind"] == "Ingress"]
    routes = {}
    for ingress in ingresses:
        notes = ingress["metadata"]["annotations"]
        assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
        assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
        assert notes["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
        read_timeout = float(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"])
        assert read_timeout >= settings.upstream_idle_timeout_s
        assert read_timeout >= settings.upstream_first_byte_timeout_s
        tls_hosts = {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
        for rule in ingress["spec"]["rules"]:
            assert rule["host"] in tls_hosts
            (path,) = rule["http"]["paths"]
            routes[rule["host"]] = path["backend"]["service"]["name"]
    domain = settings.base_domain
    assert routes == {f"*.{domain}": "lorry-gateway", f"admin.{domain}": "lorry-control-plane"}
    assert urlsplit(settings.public_url("demo")).hostname == f"demo.{domain}"


def test_images_are_pinned(objects: list[Object]) -> None:
    for workload, container in containers(objects):
        image = container["image"]
        tag = image.rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), f"{workload['metadata']['name']}: pin {image}"
