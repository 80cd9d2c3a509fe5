from __future__ import annotations

import httpx

from tests.conftest import RowCounter


async def test_bootstrap_and_operations(
    admin: httpx.AsyncClient, anonymous: httpx.AsyncClient, rows: RowCounter
) -> None:
    assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
    ready = await anonymous.get("/readyz")
    assert ready.status_code == 200, ready.text
    counts = await rows.snapshot()
    assert counts["organizations"] == 1 and counts["projects"] == 1 and counts["admin_tokens"] == 1
    missing = await anonymous.get("/no-such-route")
    assert missing.status_code == 404
    assert missing.json() == {"error": "Not found", "code": "not_found"}
