"""CORS: no header at all by default; named origins only when configured, on the fast path,
the FastAPI routes and error answers alike, in-process and over real HTTP."""

from __future__ import annotations

import pytest

from encoder_service.api.app import create_app
from encoder_service.settings import Settings
from tests.api.conftest import TRANSPORTS, Catalog, api_client, bearer, make_settings

DASH = "https://dash.example.org"
EVIL = "https://evil.example.net"
ACAO = "access-control-allow-origin"


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cors_is_off_by_default(settings: Settings, catalog: Catalog, transport: str) -> None:
    assert settings.cors_origin_list == []
    async with api_client(create_app(settings), transport) as client:
        answer = await client.options("/v1/users/u1/embedding", headers=preflight(DASH))
        assert ACAO not in answer.headers
        assert answer.status_code == 405
        read = await client.get(
            "/v1/users/u1/embedding", headers={"Origin": DASH, **bearer("read")}
        )
        assert read.status_code == 200
        assert not any(h.startswith("access-control-") for h in read.headers)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_only_named_origins_are_allowed(
    redis_url: str, catalog: Catalog, transport: str
) -> None:
    settings = make_settings(redis_url, cors_origins=f"{DASH}, https://ops.example.org")
    async with api_client(create_app(settings), transport) as client:
        allowed = await client.options("/v1/users/u1/embedding", headers=preflight(DASH))
        assert allowed.status_code == 200
        assert allowed.headers[ACAO] == DASH
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in allowed.headers

        refused = await client.options("/v1/users/u1/embedding", headers=preflight(EVIL))
        assert refused.status_code == 400
        assert ACAO not in refused.headers

        # the fast path (binary read) and a FastAPI route both carry the header
        binary = await client.get(
            "/v1/users/u1/embedding",
            headers={"Origin": DASH, "Accept": "application/octet-stream", **bearer("read")},
        )
        assert binary.status_code == 200 and binary.headers[ACAO] == DASH
        exposed = binary.headers["access-control-expose-headers"].lower()
        assert "x-embedding-version" in exposed and "x-embedding-dim" in exposed
        batch = await client.post(
            "/v1/embeddings:batch",
            json={"user_ids": ["u1"]},
            headers={"Origin": DASH, **bearer("read")},
        )
        assert batch.status_code == 200 and batch.headers[ACAO] == DASH

        # a page on the allowed origin can read why it was refused
        unauthenticated = await client.get("/v1/users/u1/embedding", headers={"Origin": DASH})
        assert unauthenticated.status_code == 401 and unauthenticated.headers[ACAO] == DASH

        other = await client.get(
            "/v1/users/u1/embedding", headers={"Origin": EVIL, **bearer("read")}
        )
        assert ACAO not in other.headers
