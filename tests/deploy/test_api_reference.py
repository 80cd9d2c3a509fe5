"""docs/api-reference.md and docs/openapi.json are what scripts/gen_api_reference.py renders from the
control plane's OpenAPI schema today. When this fails: `.venv/bin/python scripts/gen_api_reference.py`."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

from tests.deploy.support import REPO

SCRIPT = REPO / "scripts" / "gen_api_reference.py"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_current() -> None:
    gen = generator()
    rendered: dict[str, str] = gen.render()
    stale = gen.stale_files(REPO / "docs", rendered)
    assert not stale, f"stale: {stale}; run .venv/bin/python scripts/gen_api_reference.py"


def test_reference_covers_every_route_and_schema() -> None:
    gen = generator()
    schema: dict[str, Any] = gen.openapi_schema()
    markdown: str = gen.render_markdown(schema)
    for path, item in schema["paths"].items():
        for method in item:
            assert f"### `{method.upper()} {path}`" in markdown
    for name in schema["components"]["schemas"]:
        assert f'<a id="{gen._anchor(name)}"></a>' in markdown
    # Every link points at an anchor that exists.
    anchors = {line.split('"')[1] for line in markdown.splitlines() if line.startswith('<a id="')}
    import re

    assert set(re.findall(r"\]\(#(schema-[a-z0-9-]+)\)", markdown)) <= anchors


def test_rendering_is_deterministic_and_ignores_the_environment(monkeypatch: Any) -> None:
    gen = generator()
    first = gen.render()
    monkeypatch.setenv("LORRY_BASE_DOMAIN", "elsewhere.example")
    monkeypatch.setenv("LORRY_MAX_LORA_RANK", "8")
    assert gen.render() == first
    assert json.loads(first["openapi.json"])["openapi"].startswith("3.")
