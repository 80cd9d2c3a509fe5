#!/usr/bin/env python3
"""Generate docs/api-reference.md and docs/openapi.json from the control plane's OpenAPI schema.

    .venv/bin/python scripts/gen_api_reference.py           # rewrite both files
    .venv/bin/python scripts/gen_api_reference.py --check   # exit 1 when either is stale

The output depends only on the code: settings are the defaults (no environment, no database), keys
and sections are emitted in a fixed order, and nothing time- or host-dependent is written.
tests/deploy/test_api_reference.py fails when the committed files differ from a fresh render.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs"
MARKDOWN_NAME = "api-reference.md"
JSON_NAME = "openapi.json"
METHOD_ORDER = ("get", "post", "put", "patch", "delete", "head", "options")
SUCCESS_PREFIXES = ("1", "2", "3")


def openapi_schema() -> dict[str, Any]:
    """The schema `/openapi.json` serves, from an app built on default settings."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from control_plane.app import create_app
    from lorry.settings import LorrySettings

    # model_construct: the defaults, untouched by LORRY_* variables of whoever runs this.
    settings = LorrySettings.model_construct(database_url="sqlite+aiosqlite:///:memory:")
    schema: dict[str, Any] = create_app(settings).openapi()
    return schema


# -- JSON-schema types as short Markdown ---------------------------------------------------------


def _anchor(name: str) -> str:
    return "schema-" + "".join(ch.lower() if ch.isalnum() else "-" for ch in name)


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.replace("|", "\\|").split())


def type_of(schema: Mapping[str, Any]) -> str:
    """A compact description of a JSON schema: `string`, `array of [Foo](#…)`, `"a" | "b"`…"""
    if "$ref" in schema:
        name = _ref_name(str(schema["$ref"]))
        return f"[{name}](#{_anchor(name)})"
    if "const" in schema:
        return _code(json.dumps(schema["const"]))
    if "enum" in schema:
        return " \\| ".join(_code(json.dumps(value)) for value in schema["enum"])
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            parts = [type_of(part) for part in schema[combinator]]
            joiner = " & " if combinator == "allOf" else " \\| "
            text = joiner.join(dict.fromkeys(parts))
            if "discriminator" in schema:
                text += f" (by {_code(str(schema['discriminator'].get('propertyName', '')))})"
            return text
    kind = schema.get("type")
    if isinstance(kind, list):
        return " \\| ".join(type_of({**schema, "type": item}) for item in kind)
    if kind == "array":
        items = schema.get("items")
        return f"array of {type_of(items)}" if isinstance(items, Mapping) else "array"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            return f"object of {type_of(extra)}"
        return "object"
    if isinstance(kind, str):
        fmt = schema.get("format")
        return f"{kind} ({fmt})" if fmt else kind
    return "any"


def constraints_of(schema: Mapping[str, Any]) -> str:
    notes: list[str] = []
    for key, label in (
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ):
        if key in schema:
            notes.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        notes.append(f"pattern {_code(str(schema['pattern']))}")
    if "default" in schema:
        notes.append(f"default {_code(json.dumps(schema['default']))}")
    return ", ".join(notes)


def describe(schema: Mapping[str, Any]) -> str:
    parts = [str(schema.get("description", "")).strip(), constraints_of(schema)]
    return _cell("; ".join(part for part in parts if part))


# -- sections --------------------------------------------------------------------------------------


def _operations(schema: Mapping[str, Any]) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    """(tag, path, method, operation), sorted by tag, path and method order."""
    found: list[tuple[str, str, str, Mapping[str, Any]]] = []
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in METHOD_ORDER:
                continue
            tags = operation.get("tags") or ["other"]
            found.append((str(tags[0]), str(path), method, operation))
    return sorted(found, key=lambda op: (op[0], op[1], METHOD_ORDER.index(op[2])))


def _parameters(operation: Mapping[str, Any]) -> list[str]:
    params = operation.get("parameters") or []
    if not params:
        return []
    lines = ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
    for param in params:
        param_schema = param.get("schema", {})
        text = describe({**param_schema, "description": param.get("description", "")})
        lines.append(
            f"| {_code(str(param['name']))} | {param.get('in', '')} | {type_of(param_schema)} | "
            f"{'yes' if param.get('required') else 'no'} | {text} |"
        )
    return ["**Parameters**", "", *lines, ""]


def _request_body(operation: Mapping[str, Any]) -> list[str]:
    body = operation.get("requestBody")
    if not body:
        return []
    lines = []
    for media_type, content in sorted(body.get("content", {}).items()):
        media_schema = content.get("schema", {})
        shown = type_of(media_schema) if media_schema else "raw bytes"
        lines.append(f"- {_code(media_type)}: {shown}")
    required = " (required)" if body.get("required") else ""
    return [f"**Request body**{required}", "", *lines, ""]


def _responses(operation: Mapping[str, Any]) -> list[str]:
    responses: Mapping[str, Any] = operation.get("responses", {})
    lines = ["| status | meaning | body |", "|---|---|---|"]
    errors: list[str] = []
    for status in sorted(responses):
        response = responses[status]
        content = response.get("content", {})
        bodies = [
            f"{type_of(value['schema'])} ({_code(media)})" if value.get("schema") else _code(media)
            for media, value in sorted(content.items())
        ]
        if not status.startswith(SUCCESS_PREFIXES) and all(
            value.get("schema", {}).get("$ref", "").endswith("/ErrorBody") for value in content.values()
        ):
            errors.append(status)
            continue
        lines.append(
            f"| {status} | {_cell(str(response.get('description', '')))} | {', '.join(bodies) or '—'} |"
        )
    out = ["**Responses**", "", *lines, ""]
    if errors:
        out += [f"Errors: {', '.join(errors)}, each with an [ErrorBody](#{_anchor('ErrorBody')}).", ""]
    return out


def _operation_section(path: str, method: str, operation: Mapping[str, Any]) -> list[str]:
    title = f"### `{method.upper()} {path}`"
    summary = str(operation.get("summary", "")).strip()
    lines = [title, ""]
    if summary:
        lines += [summary, ""]
    description = str(operation.get("description", "")).strip()
    if description and description != summary:
        lines += [description, ""]
    return lines + _parameters(operation) + _request_body(operation) + _responses(operation)


def _schema_section(name: str, schema: Mapping[str, Any]) -> list[str]:
    lines = [f'<a id="{_anchor(name)}"></a>', f"### {name}", ""]
    description = str(schema.get("description", "")).strip()
    if description:
        lines += [description, ""]
    properties: Mapping[str, Any] = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", []))
        lines += ["| field | type | required | description |", "|---|---|---|---|"]
        for field, field_schema in properties.items():
            lines.append(
                f"| {_code(field)} | {type_of(field_schema)} | {'yes' if field in required else 'no'} | "
                f"{describe(field_schema)} |"
            )
        lines.append("")
        if schema.get("additionalProperties") is False:
            lines += ["Other fields are rejected (400 `invalid_request`).", ""]
    else:
        lines += [f"Type: {type_of(schema)}", ""]
    return lines


def _toc(operations: Iterable[tuple[str, str, str, Mapping[str, Any]]]) -> list[str]:
    lines: list[str] = []
    current = None
    for tag, path, method, operation in operations:
        if tag != current:
            lines.append(f"- **{tag}**")
            current = tag
        summary = str(operation.get("summary", "")).strip()
        suffix = f" — {summary}" if summary else ""
        lines.append(f"  - `{method.upper()} {path}`{suffix}")
    return lines


def render_markdown(schema: Mapping[str, Any]) -> str:
    info = schema.get("info", {})
    operations = _operations(schema)
    lines = [
        "# Lorry admin API reference",
        "",
        "<!-- Generated by scripts/gen_api_reference.py from the control plane's OpenAPI schema. "
        "Do not edit by hand. -->",
        "",
        f"{info.get('title', 'Lorry admin API')}, version {info.get('version', '')}, OpenAPI "
        f"{schema.get('openapi', '')}. The machine-readable schema is [openapi.json](openapi.json); "
        "a running control plane serves the same document at `/openapi.json`.",
        "",
        "- Base URL: the control plane, e.g. `https://admin.<base-domain>` behind the proxy, or "
        "`http://127.0.0.1:8081` with `lorry up`.",
        "- Authentication: `Authorization: Bearer lorry_admin_…` on every `/v1` route. Install tokens act "
        "on every organization; org tokens on their own.",
        "- Scoped routes take `?orgSlug=` (and `&projectSlug=`); without them: 400 `scope_required`.",
        '- JSON field names are camelCase; bodies are wrapped (`{"deployment": …}`, `{"keys": […]}`).',
        '- Every error, validation included, is `{"error": "<message>", "code": "<machine code>"}` '
        "([ErrorBody](#" + _anchor("ErrorBody") + ")).",
        "",
        "## Contents",
        "",
        *_toc(operations),
        "- [Schemas](#schemas)",
        "",
    ]
    current = None
    for tag, path, method, operation in operations:
        if tag != current:
            lines += [f"## {tag}", ""]
            current = tag
        lines += _operation_section(path, method, operation)
    lines += ["## Schemas", ""]
    components: Mapping[str, Any] = schema.get("components", {}).get("schemas", {})
    for name in sorted(components):
        lines += _schema_section(name, components[name])
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def render_json(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render(schema: Mapping[str, Any] | None = None) -> dict[str, str]:
    """File name → content, for every generated file."""
    resolved = openapi_schema() if schema is None else schema
    return {MARKDOWN_NAME: render_markdown(resolved), JSON_NAME: render_json(resolved)}


def stale_files(out_dir: Path, rendered: Mapping[str, str]) -> list[str]:
    stale = []
    for name, content in rendered.items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed files are stale")
    parser.add_argument("--out-dir", type=Path, default=DOCS_DIR, help="where the files go (default docs/)")
    args = parser.parse_args(argv)
    rendered = render()
    out_dir: Path = args.out_dir
    if args.check:
        stale = stale_files(out_dir, rendered)
        if stale:
            print(f"stale: {', '.join(stale)}; run scripts/gen_api_reference.py", file=sys.stderr)
            return 1
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in rendered.items():
        (out_dir / name).write_text(content, encoding="utf-8")
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
