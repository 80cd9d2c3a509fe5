"""The admin API as gateway tests use it (deployments, keys, jobs), asserting each call succeeded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.conftest import DEFAULT_SCOPE


class AdminApi:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def _call(self, method: str, path: str, expected: int, **kwargs: Any) -> Any:
        response = await self.client.request(method, path, params=DEFAULT_SCOPE, **kwargs)
        assert response.status_code == expected, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    async def import_job(self, name: str, directory: Path, model: str | None = None) -> dict[str, Any]:
        config = {"model": model} if model else {}
        body = {"name": name, "config": config, "source": {"kind": "directory", "path": str(directory)}}
        job: dict[str, Any] = (await self._call("POST", "/v1/jobs", 201, json=body))["job"]
        return job

    async def create_deployment(
        self,
        slug: str,
        *,
        job_id: str | None = None,
        base_model: str | None = None,
        auth_mode: str | None = None,
    ) -> dict[str, Any]:
        target: dict[str, Any]
        if job_id is not None:
            target = {"kind": "adapter", "adapter": {"kind": "final", "jobId": job_id}}
        else:
            target = {"kind": "base_model", "baseModel": base_model}
        body: dict[str, Any] = {"slug": slug, "target": target}
        if auth_mode is not None:
            body["authMode"] = auth_mode
        deployment: dict[str, Any] = (await self._call("POST", "/v1/endpoints", 201, json=body))["deployment"]
        return deployment

    async def patch_deployment(self, deployment_id: str, **fields: Any) -> dict[str, Any]:
        deployment: dict[str, Any] = (
            await self._call("PATCH", f"/v1/endpoints/{deployment_id}", 200, json=fields)
        )["deployment"]
        return deployment

    async def retarget(self, deployment_id: str, job_id: str) -> dict[str, Any]:
        return await self.patch_deployment(
            deployment_id, target={"kind": "adapter", "adapter": {"kind": "final", "jobId": job_id}}
        )

    async def delete_deployment(self, deployment_id: str) -> None:
        await self._call("DELETE", f"/v1/endpoints/{deployment_id}", 204)

    async def create_key(self, deployment_id: str, **fields: Any) -> dict[str, Any]:
        body = {"label": "test", **fields}
        key: dict[str, Any] = (
            await self._call("POST", f"/v1/endpoints/{deployment_id}/keys", 201, json=body)
        )["key"]
        return key

    async def revoke_key(self, deployment_id: str, key_id: str) -> None:
        await self._call("DELETE", f"/v1/endpoints/{deployment_id}/keys/{key_id}", 204)

    async def roll_key(self, deployment_id: str, key_id: str, grace_s: int) -> dict[str, Any]:
        rolled: dict[str, Any] = await self._call(
            "POST",
            f"/v1/endpoints/{deployment_id}/keys/{key_id}/roll",
            201,
            json={"gracePeriodSeconds": grace_s},
        )
        return rolled
