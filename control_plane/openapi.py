"""The published schema: every error is the `{error, code}` envelope; FastAPI's 422 never appears."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from control_plane.schemas import ErrorBody

_ERROR_STATUSES = {
    "400": "Invalid request",
    "401": "Missing or invalid admin token",
    "403": "The token may not act in that scope",
    "404": "Not found in that scope",
    "409": "Conflict with the current state",
    "413": "Request body too large",
}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components["ErrorBody"] = ErrorBody.model_json_schema()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in _ERROR_STATUSES.items():
                    responses.setdefault(
                        status,
                        {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}},
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
