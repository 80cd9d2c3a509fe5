"""`CloudApiClient` and `AsyncCloudApiClient`: one method per admin route, over httpx.

Each method is generated from its `Call` builder in `lorry.client.calls`, keeping the builder's
signature, so the sync and async clients cannot drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, get_args, get_type_hints

import httpx
import orjson

from lorry import __version__
from lorry.client import calls
from lorry.client.errors import error_from_response
from lorry.client.models import AdapterKind, Artifact, DeploymentScope
from lorry.credentials import Credentials, default_cloud_api_url, ensure_credentials

P = ParamSpec("P")
T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]
UPLOAD_CHUNK = 1 << 20


class _ClientBase:
    def __init__(
        self,
        base_url: str | None = None,
        credentials: Credentials | str | None = None,
        *,
        timeout: float = 60.0,
    ) -> None:
        if isinstance(credentials, str):
            credentials = Credentials(token=credentials)
        self.credentials = credentials if credentials is not None else ensure_credentials()
        self.base_url = (
            base_url if base_url is not None else default_cloud_api_url(self.credentials)
        ).rstrip("/")
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self.credentials.token}",
            "x-lorry-client": f"lorry-py/{__version__}",
        }

    @staticmethod
    def _read(call: calls.Call[T], response: httpx.Response) -> T:
        if not response.is_success:
            raise error_from_response(response.status_code, response.content)
        body = orjson.loads(response.content) if response.content else None
        return call.parse(body)

    @staticmethod
    def _json(call: calls.Call[Any]) -> bytes | None:
        return None if call.json is None else orjson.dumps(call.json)


def _describe(method: Callable[..., Any], builder: Callable[..., Any], owner: str) -> None:
    """Give the generated method the builder's name, docs and signature (for help() and IDEs)."""
    hints = get_type_hints(builder)
    signature = inspect.signature(builder)
    parameters = [
        param.replace(annotation=hints.get(name, param.annotation))
        for name, param in signature.parameters.items()
    ]
    returns = get_args(hints["return"])[0]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__name__ = builder.__name__
    method.__qualname__ = f"{owner}.{builder.__name__}"
    method.__doc__ = builder.__doc__
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *parameters], return_annotation=returns
    )


def _sync(builder: Callable[P, calls.Call[T]]) -> Callable[Concatenate[CloudApiClient, P], T]:
    def method(self: CloudApiClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.send(builder(*args, **kwargs))

    _describe(method, builder, "CloudApiClient")
    return method


def _async(
    builder: Callable[P, calls.Call[T]],
) -> Callable[Concatenate[AsyncCloudApiClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncCloudApiClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.send(builder(*args, **kwargs))

    _describe(method, builder, "AsyncCloudApiClient")
    return method


def _file_chunks(path: Path, on_progress: ProgressCallback | None) -> Iterator[bytes]:
    total = path.stat().st_size
    sent = 0
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK):
            sent += len(chunk)
            yield chunk
            if on_progress is not None:
                on_progress(sent, total)


async def _async_file_chunks(path: Path, on_progress: ProgressCallback | None) -> AsyncIterator[bytes]:
    for chunk in _file_chunks(path, on_progress):
        yield chunk


class CloudApiClient(_ClientBase):
    """The admin API over a blocking httpx client. Use as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str | None = None,
        credentials: Credentials | str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, credentials, timeout=timeout)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers(), timeout=timeout, transport=transport
        )

    def __enter__(self) -> CloudApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: calls.Call[T], on_progress: ProgressCallback | None = None) -> T:
        headers = {"content-type": call.content_type or "application/json"}
        content: bytes | Iterator[bytes] | None = self._json(call)
        if call.upload is not None:
            content = _file_chunks(call.upload, on_progress)
            headers["content-length"] = str(call.upload.stat().st_size)
        response = self._http.request(
            call.method, call.path, params=call.params, content=content, headers=headers
        )
        return self._read(call, response)

    def upload_artifact(
        self,
        job_id: str,
        scope: DeploymentScope,
        archive: Path,
        *,
        kind: AdapterKind = "final",
        step: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Artifact:
        """Upload a `.tar.gz` or `.zip` of one PEFT LoRA adapter as the job's final adapter or
        checkpoint `step`; `on_progress(sent, total)` is called as the bytes go out."""
        return self.send(calls.upload_artifact(job_id, scope, archive, kind=kind, step=step), on_progress)

    me = _sync(calls.me)
    list_projects = _sync(calls.list_projects)
    create_project = _sync(calls.create_project)
    create_org = _sync(calls.create_org)
    list_admin_tokens = _sync(calls.list_admin_tokens)
    create_admin_token = _sync(calls.create_admin_token)
    revoke_admin_token = _sync(calls.revoke_admin_token)
    roll_admin_token = _sync(calls.roll_admin_token)
    list_deployments = _sync(calls.list_deployments)
    get_deployment = _sync(calls.get_deployment)
    create_deployment = _sync(calls.create_deployment)
    update_deployment = _sync(calls.update_deployment)
    delete_deployment = _sync(calls.delete_deployment)
    list_deployment_keys = _sync(calls.list_deployment_keys)
    create_deployment_key = _sync(calls.create_deployment_key)
    revoke_deployment_key = _sync(calls.revoke_deployment_key)
    roll_deployment_key = _sync(calls.roll_deployment_key)
    list_jobs = _sync(calls.list_jobs)
    get_job = _sync(calls.get_job)
    create_job = _sync(calls.create_job)
    import_job = _sync(calls.import_job)
    delete_job = _sync(calls.delete_job)
    list_engines = _sync(calls.list_engines)
    get_engine = _sync(calls.get_engine)
    create_engine = _sync(calls.create_engine)
    update_engine = _sync(calls.update_engine)
    delete_engine = _sync(calls.delete_engine)
    list_audit_events = _sync(calls.list_audit_events)


class AsyncCloudApiClient(_ClientBase):
    """The admin API over an async httpx client. Use `async with` or call `aclose()`."""

    def __init__(
        self,
        base_url: str | None = None,
        credentials: Credentials | str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, credentials, timeout=timeout)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncCloudApiClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: calls.Call[T], on_progress: ProgressCallback | None = None) -> T:
        headers = {"content-type": call.content_type or "application/json"}
        content: bytes | AsyncIterator[bytes] | None = self._json(call)
        if call.upload is not None:
            content = _async_file_chunks(call.upload, on_progress)
            headers["content-length"] = str(call.upload.stat().st_size)
        response = await self._http.request(
            call.method, call.path, params=call.params, content=content, headers=headers
        )
        return self._read(call, response)

    async def upload_artifact(
        self,
        job_id: str,
        scope: DeploymentScope,
        archive: Path,
        *,
        kind: AdapterKind = "final",
        step: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Artifact:
        """Upload a `.tar.gz` or `.zip` of one PEFT LoRA adapter as the job's final adapter or
        checkpoint `step`; `on_progress(sent, total)` is called as the bytes go out."""
        return await self.send(
            calls.upload_artifact(job_id, scope, archive, kind=kind, step=step), on_progress
        )

    me = _async(calls.me)
    list_projects = _async(calls.list_projects)
    create_project = _async(calls.create_project)
    create_org = _async(calls.create_org)
    list_admin_tokens = _async(calls.list_admin_tokens)
    create_admin_token = _async(calls.create_admin_token)
    revoke_admin_token = _async(calls.revoke_admin_token)
    roll_admin_token = _async(calls.roll_admin_token)
    list_deployments = _async(calls.list_deployments)
    get_deployment = _async(calls.get_deployment)
    create_deployment = _async(calls.create_deployment)
    update_deployment = _async(calls.update_deployment)
    delete_deployment = _async(calls.delete_deployment)
    list_deployment_keys = _async(calls.list_deployment_keys)
    create_deployment_key = _async(calls.create_deployment_key)
    revoke_deployment_key = _async(calls.revoke_deployment_key)
    roll_deployment_key = _async(calls.roll_deployment_key)
    list_jobs = _async(calls.list_jobs)
    get_job = _async(calls.get_job)
    create_job = _async(calls.create_job)
    import_job = _async(calls.import_job)
    delete_job = _async(calls.delete_job)
    list_engines = _async(calls.list_engines)
    get_engine = _async(calls.get_engine)
    create_engine = _async(calls.create_engine)
    update_engine = _async(calls.update_engine)
    delete_engine = _async(calls.delete_engine)
    list_audit_events = _async(calls.list_audit_events)
