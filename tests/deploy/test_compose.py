"""deploy/compose.yaml: valid Compose, and everything it names exists and agrees (DESIGN §11).

No Docker engine runs here, so the file is checked against the Compose Specification schema and
cross-checked against the Dockerfiles, the CLI, the settings and the proxy configuration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import pytest

from lorry.engine_spec import static_engines
from lorry.settings import LorrySettings
from tests.deploy import support
from tests.deploy.support import (
    COMPOSE_FILE,
    DEPLOY,
    ENV_EXAMPLE,
    InterpolationError,
    Interpolator,
    command_of,
    compose_raw,
    compose_with,
    environment_of,
    example_env,
    flag_values,
    mounts_of,
)

# The largest ranks vLLM's --max-lora-rank accepts (shared/reference/vllm.md §1.1).
VLLM_LORA_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}
LORRY_DOCKERFILE = "docker/Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_with(example_env())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def lorry_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services built from docker/Dockerfile."""
    return {
        name: service
        for name, service in services.items()
        if (service.get("build") or {}).get("dockerfile") == LORRY_DOCKERFILE
    }


def settings_for(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> LorrySettings:
    """The settings the service's process would build from its environment."""
    import os

    for name in list(os.environ):
        if name.startswith("LORRY_"):
            monkeypatch.delenv(name)
    for name, value in environment_of(service).items():
        monkeypatch.setenv(name, value)
    return LorrySettings()


def engines_alternatives() -> Iterator[tuple[str, str]]:
    """LORRY_ENGINES from .env.example: the active value and every commented alternative."""
    yield "default", support.parse_env_file(ENV_EXAMPLE)["LORRY_ENGINES"]
    for index, value in enumerate(support.commented_alternatives(ENV_EXAMPLE, "LORRY_ENGINES")):
        yield f"alternative-{index}", value


# -- the schema ----------------------------------------------------------------------------------------


def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads(support.VENDORED_COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def test_vendored_schema_is_the_shared_one() -> None:
    """tests/deploy/compose-spec.json is a copy of ../shared/schemas/compose-spec.json (Apache-2.0)."""
    if not support.SHARED_COMPOSE_SCHEMA.is_file():
        pytest.skip("../shared/schemas/compose-spec.json is not next to this clone")
    assert support.VENDORED_COMPOSE_SCHEMA.read_bytes() == support.SHARED_COMPOSE_SCHEMA.read_bytes()


def test_compose_file_validates_against_the_compose_schema() -> None:
    errors = sorted(_validator().iter_errors(compose_raw()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_interpolated_compose_file_validates_too(compose: dict[str, Any]) -> None:
    errors = sorted(_validator().iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_service() -> None:
    """The validator is sharp: a misspelt key fails."""
    broken = compose_raw()
    broken["services"]["gateway"]["comand"] = ["lorry"]
    assert any(True for _ in _validator().iter_errors(broken))


# -- variables and secrets -----------------------------------------------------------------------------


def test_every_variable_is_documented_in_env_example() -> None:
    used = support.referenced_variables(COMPOSE_FILE.read_text(encoding="utf-8"))
    documented = set(support.parse_env_file(ENV_EXAMPLE))
    assert used - documented == set(), f"used in compose.yaml but not in .env.example: {used - documented}"
    assert documented - used == set(), f"in .env.example but unused by compose.yaml: {documented - used}"


def test_no_secret_is_baked_in() -> None:
    """Secrets come from deploy/.env: a missing password stops `compose up` instead of defaulting."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "lorry_admin_" not in text and not re.search(r"lorry_[A-Za-z0-9]{12}_", text)
    assert support.parse_env_file(ENV_EXAMPLE)["POSTGRES_PASSWORD"] == ""
    env = support.parse_env_file(ENV_EXAMPLE)
    with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD"):
        Interpolator(env).tree(compose_raw())
    for name, service in compose_raw()["services"].items():
        for key, value in environment_of(service).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*|:-)\}", value), (
                    f"{name}.{key} must come from deploy/.env (${{VAR:?…}} or an empty default)"
                )
    # The password reaches Postgres and Lorry only through the variable.
    resolved = compose_with({**env, "POSTGRES_PASSWORD": "s3cr3tvalue"})
    assert environment_of(resolved["services"]["postgres"])["POSTGRES_PASSWORD"] == "s3cr3tvalue"
    assert ":s3cr3tvalue@postgres:" in environment_of(resolved["services"]["migrate"])["LORRY_DATABASE_URL"]


def test_every_lorry_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    fields = {f"LORRY_{name.upper()}" for name in LorrySettings.model_fields}
    named = {
        key for service in services.values() for key in environment_of(service) if key.startswith("LORRY_")
    }
    named |= {key for key in support.parse_env_file(ENV_EXAMPLE) if key.startswith("LORRY_")}
    assert named, "compose.yaml sets no LORRY_ variable"
    assert named - fields == set(), f"not LorrySettings fields (silently ignored): {named - fields}"


def test_lorry_services_build_valid_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    lorry = lorry_services(services)
    assert set(lorry) == {"migrate", "control-plane", "gateway"}
    for name, service in lorry.items():
        settings = settings_for(service, monkeypatch)
        assert settings.database_url.startswith("postgresql+asyncpg://lorry:"), name
        assert urlsplit(settings.database_url).hostname == "postgres", name
        assert settings.base_domain == example_env()["BASE_DOMAIN"], name
        static_engines(settings)  # raises on a malformed LORRY_ENGINES entry


# -- images and commands -------------------------------------------------------------------------------


def test_images_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = str(service.get("image", ""))
        assert image, f"{name} names no image"
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: pin {image}"
        build = service.get("build")
        if build:
            dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            assert dockerfile.parent == support.DOCKER, f"{name}: images are built from docker/"
    built = {service["build"]["dockerfile"] for service in services.values() if service.get("build")}
    assert built == {LORRY_DOCKERFILE, "docker/engine-cpu.Dockerfile"}
    images = {name: service["image"] for name, service in lorry_services(services).items()}
    assert len(set(images.values())) == 1, f"one Lorry image for every Lorry process: {images}"


def test_lorry_commands_are_real_cli_commands(services: dict[str, dict[str, Any]]) -> None:
    commands = {
        name: command_of(service.get("command")) for name, service in lorry_services(services).items()
    }
    assert commands["migrate"][:2] == ["lorry", "migrate"]
    assert commands["control-plane"][:3] == ["lorry", "serve", "control-plane"]
    assert commands["gateway"][:3] == ["lorry", "serve", "gateway"]
    for argv in commands.values():
        support.check_cli_argv(argv)


def test_cli_check_is_sharp() -> None:
    with pytest.raises(AssertionError):
        support.check_cli_argv(["lorry", "serve", "gateway", "--no-such-option", "1"])
    with pytest.raises(AssertionError):
        support.check_cli_argv(["lorry", "serve", "nothing"])
    with pytest.raises(AssertionError):
        support.check_cli_argv(["lorry", "serve", "gateway", "--port", "eighty"])


def test_ports_agree(services: dict[str, dict[str, Any]]) -> None:
    flags = {name: flag_values(command_of(s.get("command"))) for name, s in lorry_services(services).items()}
    control_port, gateway_port = flags["control-plane"]["--port"], flags["gateway"]["--port"]
    ops_port = flags["gateway"]["--ops-port"]
    assert len({control_port, gateway_port, ops_port}) == 3
    # Health checks probe the ports the commands open, on the readiness routes.
    health = {name: services[name]["healthcheck"]["test"] for name in ("control-plane", "gateway")}
    assert health["control-plane"][-1] == f"http://127.0.0.1:{control_port}/readyz"
    assert health["gateway"][-1] == f"http://127.0.0.1:{ops_port}/readyz"
    # The proxy forwards to those same ports, by service name.
    proxy = environment_of(services["proxy"])
    assert proxy["PROXY_GATEWAY"] == f"gateway:{gateway_port}"
    assert proxy["PROXY_CONTROL_PLANE"] == f"control-plane:{control_port}"
    # Only the proxy publishes ports, onto the ports its configuration listens on.
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}
    targets = {str(port).rsplit(":", 1)[-1] for port in services["proxy"]["ports"]}
    assert targets == {proxy["PROXY_HTTP_PORT"], proxy["PROXY_HTTPS_PORT"]}
    # The image declares the ports the commands use.
    exposed = {
        word
        for item in support.parse_dockerfile(support.LORRY_DOCKERFILE)
        if item.keyword == "EXPOSE"
        for word in item.args.split()
    }
    assert {control_port, gateway_port, ops_port} <= exposed


def test_healthcheck_binaries_exist_in_their_images(services: dict[str, dict[str, Any]]) -> None:
    installed = {
        item.args.split()[-1].rsplit("/", 1)[-1]
        for item in support.parse_dockerfile(support.LORRY_DOCKERFILE)
        if item.keyword == "COPY" and item.stage == 2
    }
    for name in lorry_services(services):
        test = services[name].get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD" and test[1] in installed | {"lorry"}, f"{name}: {test}"


# -- volumes -------------------------------------------------------------------------------------------


def test_volumes_are_declared_and_bind_sources_exist(compose: dict[str, Any]) -> None:
    raw_services = compose_raw()["services"]
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    documented = set(support.parse_env_file(ENV_EXAMPLE))
    for name, service in compose["services"].items():
        for raw_mount, mount in zip(mounts_of(raw_services[name]), mounts_of(service), strict=True):
            if mount["type"] == "volume":
                used.add(mount["source"])
                continue
            raw_source = str(raw_mount["source"])
            if raw_source.startswith("$"):
                # Operator-provided directories (TLS, imports) come from documented variables.
                assert support.referenced_variables(raw_source) <= documented
            else:
                assert (DEPLOY / raw_source).is_file(), f"{name}: bind source {raw_source} missing"
    assert used == declared, f"declared but unused: {declared - used}; used but undeclared: {used - declared}"


def test_adapter_store_is_shared_by_control_plane_and_engines(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    control = services["control-plane"]
    store = settings_for(control, monkeypatch).adapter_store.as_posix()
    writable = [m for m in mounts_of(control) if m["target"] == store]
    assert len(writable) == 1 and writable[0]["type"] == "volume" and not writable[0]["read_only"]
    volume = writable[0]["source"]
    engines = {name: s for name, s in services.items() if name.startswith("engine-")}
    assert engines
    for name, service in engines.items():
        shared = [m for m in mounts_of(service) if m["source"] == volume]
        assert len(shared) == 1 and shared[0]["read_only"], f"{name} must mount {volume} read-only"


# -- engines -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "engines_json"), list(engines_alternatives()))
def test_lorry_engines_match_the_engine_services(
    label: str, engines_json: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each LORRY_ENGINES entry names one engine service, with that engine's own port, model,
    LoRA limits and adapter mount — the .env.example default and its commented alternatives."""
    env = {**example_env(), "LORRY_ENGINES": engines_json}
    services = compose_with(env)["services"]
    settings = settings_for(services["gateway"], monkeypatch)
    engines = static_engines(settings)
    assert engines, f"{label}: no engines"
    profiles = set()
    for engine in engines:
        url = urlsplit(engine.url)
        service = services.get(str(url.hostname))
        assert service is not None, f"{label}: {engine.url} names no compose service"
        profiles |= set(service.get("profiles", []))
        argv = command_of(service.get("command"))
        flags = flag_values(argv)
        model = flags.get("--model") or argv[0]
        assert flags["--port"] == str(url.port)
        assert "--enable-lora" in flags
        assert model == engine.base_model
        assert flags.get("--served-model-name", model) == engine.served_model_name
        assert int(flags["--max-loras"]) == engine.max_loras
        assert int(flags["--max-cpu-loras"]) == engine.max_cpu_loras
        assert int(flags["--max-lora-rank"]) == engine.max_lora_rank
        assert engine.max_lora_rank in VLLM_LORA_RANKS
        mounts = [m for m in mounts_of(service) if m["target"] == engine.adapter_root]
        assert len(mounts) == 1 and mounts[0]["read_only"] and mounts[0]["source"] == "adapters"
        runtime_lora = environment_of(service).get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        if service.get("build"):
            dockerfile = DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]
            image_env: dict[str, str] = {}
            for item in support.parse_dockerfile(dockerfile):
                if item.keyword == "ENV":
                    image_env |= support.env_assignments(item.args)
            runtime_lora = runtime_lora or image_env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        assert runtime_lora == "1", f"{url.hostname}: runtime LoRA loading must be on"
    assert len(profiles) == 1, f"{label}: one profile's engines at a time, got {profiles}"


def test_every_engine_service_is_listed_somewhere(services: dict[str, dict[str, Any]]) -> None:
    listed = set()
    for _label, value in engines_alternatives():
        listed |= {urlsplit(entry["url"]).hostname for entry in json.loads(value)}
    engines = {name for name in services if name.startswith("engine-")}
    assert engines == listed
    for name in engines:
        assert services[name].get("profiles"), f"{name} must sit in a profile (gpu or cpu)"
        assert not services[name].get("ports"), f"{name}: vLLM's port must stay private"


def test_gpu_engines_are_individually_addressed(services: dict[str, dict[str, Any]]) -> None:
    gpu = {name: s for name, s in services.items() if "gpu" in s.get("profiles", [])}
    assert len(gpu) >= 2
    devices = []
    for name, service in gpu.items():
        assert "container_name" not in service and "scale" not in service, name
        reservations = service["deploy"]["resources"]["reservations"]["devices"]
        devices += [tuple(device["device_ids"]) for device in reservations]
    assert len(devices) == len(set(devices)), "each GPU engine gets its own device"


# -- start order, shutdown, networks -----------------------------------------------------------------


def test_start_order_is_health_gated(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "migrate": {"postgres": "service_healthy"},
        "control-plane": {"postgres": "service_healthy", "migrate": "service_completed_successfully"},
        "gateway": {"postgres": "service_healthy", "migrate": "service_completed_successfully"},
        "proxy": {"control-plane": "service_healthy", "gateway": "service_healthy"},
    }
    for name, wanted in expected.items():
        got = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert got == wanted, name
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}, which has no healthcheck"
            assert not services[dep].get("profiles") or services[name].get("profiles"), (
                f"{name} depends on {dep}, which only runs in a profile"
            )
    assert services["migrate"]["restart"] == "no"


def test_gateway_outlives_its_shutdown_deadline(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = services["gateway"]
    deadline = settings_for(gateway, monkeypatch).shutdown_deadline_s
    grace = support.duration_seconds(str(gateway["stop_grace_period"]))
    assert grace > deadline, f"stop_grace_period {grace}s must exceed LORRY_SHUTDOWN_DEADLINE_S {deadline}s"
    assert "container_name" not in gateway, "a fixed container name prevents --scale"


def test_engines_and_database_are_private(services: dict[str, dict[str, Any]]) -> None:
    compose = compose_raw()
    proxy_networks = set(services["proxy"]["networks"])
    for name, service in services.items():
        if name.startswith("engine-"):
            assert not set(service["networks"]) & proxy_networks, f"the proxy must not reach {name}"
            assert set(service["networks"]) & set(services["gateway"]["networks"]), f"gateways reach {name}"
    assert services["postgres"]["networks"] == ["backend"]
    assert compose["networks"]["backend"].get("internal") is True
    assert not set(services["postgres"]["networks"]) & proxy_networks
