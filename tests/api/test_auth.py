"""API keys and scopes: refusals (401/403) and admission for each scope, and the config format."""

from __future__ import annotations

import hashlib
import logging

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from encoder_service.api.app import create_app
from encoder_service.api.auth import (
    AuthenticationError,
    Authenticator,
    hash_api_key,
    new_api_key,
    parse_api_keys,
)
from encoder_service.api.deps import Admin, Ingester, Reader
from encoder_service.settings import Settings
from tests.api.conftest import KEYS, TRANSPORTS, Catalog, api_client, bearer, make_settings

PROBLEM = "application/problem+json"
UNAUTHENTICATED = "urn:encoder-service:problem:unauthenticated"
FORBIDDEN = "urn:encoder-service:problem:insufficient-scope"


def app_with_scoped_routes(settings: Settings) -> FastAPI:
    """The real app plus one route per scope, guarded by the aliases later endpoints will use
    (``POST /v1/events`` needs ``ingest``, version lifecycle needs ``admin``)."""
    app = create_app(settings)
    router = APIRouter(prefix="/scoped")

    @router.get("/read")
    async def read(principal: Reader) -> dict[str, str]:
        return {"name": principal.name}

    @router.post("/ingest")
    async def ingest(principal: Ingester) -> dict[str, str]:
        return {"name": principal.name}

    @router.post("/admin")
    async def admin(principal: Admin) -> dict[str, str]:
        return {"name": principal.name}

    app.include_router(router)
    return app


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_scope_refuses_and_admits(
    settings: Settings, catalog: Catalog, transport: str
) -> None:
    async with api_client(app_with_scoped_routes(settings), transport) as client:
        for scope in ("read", "ingest", "admin"):
            method = client.get if scope == "read" else client.post
            url = f"/scoped/{scope}"

            missing = await method(url)
            assert missing.status_code == 401
            assert missing.headers["content-type"] == PROBLEM
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["type"] == UNAUTHENTICATED

            unknown = await method(url, headers={"Authorization": "Bearer not-a-key"})
            assert unknown.status_code == 401
            assert unknown.json()["type"] == UNAUTHENTICATED

            for other in KEYS.keys() - {scope}:
                refused = await method(url, headers=bearer(other))
                assert refused.status_code == 403, (scope, other)
                assert refused.json()["type"] == FORBIDDEN
                assert refused.json()["scope"] == scope
                assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]

            admitted = await method(url, headers=bearer(scope))
            assert admitted.status_code == 200
            assert admitted.json() == {"name": f"{scope}-client"}


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", f"Basic {KEYS['read']}", f"Token {KEYS['read']}"],
)
async def test_malformed_authorization_is_401(
    settings: Settings, catalog: Catalog, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with api_client(create_app(settings), "asgi", headers) as client:
        response = await client.get("/v1/users/u1/embedding")
    assert response.status_code == 401
    assert response.json()["type"] == UNAUTHENTICATED


async def test_scheme_name_is_case_insensitive(settings: Settings, catalog: Catalog) -> None:
    headers = {"Authorization": f"bearer {KEYS['read']}"}
    async with api_client(create_app(settings), "asgi", headers) as client:
        assert (await client.get("/v1/users/u1/embedding")).status_code == 200


async def test_every_v1_endpoint_needs_a_read_key(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    calls = [
        ("GET", "/v1/users/u1/embedding", None),
        ("POST", "/v1/embeddings:batch", {"user_ids": ["u1"]}),
        ("GET", "/v1/versions", None),
        ("GET", "/v1/versions/v1", None),
    ]
    for method, url, body in calls:
        for key, status in ((None, 401), ("ingest", 403), ("admin", 403), ("read", 200)):
            headers = {"Authorization": ""} if key is None else bearer(key)
            response = await client.request(method, url, json=body, headers=headers)
            assert response.status_code == status, (method, url, key)


async def test_operational_endpoints_need_no_key(settings: Settings, catalog: Catalog) -> None:
    async with api_client(create_app(settings), "asgi") as anonymous:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await anonymous.get(path)).status_code == 200, path


async def test_no_auth_mode_admits_everyone_and_warns(
    redis_url: str, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="encoder_service.api.auth"):
        app = app_with_scoped_routes(make_settings(redis_url, auth_mode="none"))
    assert "authentication is OFF" in caplog.text
    async with api_client(app, "asgi") as client:
        assert (await client.get("/v1/users/u1/embedding")).status_code == 200
        assert (await client.post("/scoped/admin")).json() == {"name": "anonymous"}


def test_no_keys_configured_warns(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="encoder_service.api.auth"):
        create_app(make_settings(redis_url, api_keys=""))
    assert "no API keys configured" in caplog.text


def test_hash_is_sha256_hex() -> None:
    assert hash_api_key("s3cret") == hashlib.sha256(b"s3cret").hexdigest()


def test_a_generated_key_authenticates_through_its_entry() -> None:
    key, entry = new_api_key("recs-team", ["read", "admin"])
    assert key not in entry
    (parsed,) = parse_api_keys(entry)
    assert (parsed.name, parsed.scopes) == ("recs-team", {"read", "admin"})
    principal = Authenticator([parsed]).authenticate(key)
    assert (principal.name, principal.scopes) == ("recs-team", {"read", "admin"})
    with pytest.raises(AuthenticationError):
        Authenticator([parsed]).authenticate(key + "x")


def test_entries_parse_with_spaces_and_upper_case_hex() -> None:
    digest = hash_api_key("k")
    keys = parse_api_keys(f" a:read:{digest.upper()} , b:ingest+admin:{digest},")
    assert [(k.name, k.scopes, k.digest) for k in keys] == [
        ("a", {"read"}, digest),
        ("b", {"ingest", "admin"}, digest),
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("reader:read:plain-text-key", "hex digest"),
        (f"reader:read:{'a' * 63}", "hex digest"),
        (f"reader:read:{'a' * 31}:{'a' * 64}", "hex salt"),
        (f"reader:read:{'a' * 8}:{'a' * 64}", "hex salt"),
        (f"reader:write:{'a' * 64}", "scopes"),
        (f"reader::{'a' * 64}", "scopes"),
        (f"reader:{'a' * 64}", "is not"),
        (f"bad name:read:{'a' * 64}", "invalid name"),
        (f"r:read:{'a' * 64},r:admin:{'b' * 64}", "twice"),
    ],
)
def test_bad_entries_are_refused(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_api_keys(entry)


def test_the_app_refuses_to_start_with_bad_keys(redis_url: str) -> None:
    with pytest.raises(ValueError, match="hex digest"):
        create_app(make_settings(redis_url, api_keys="reader:read:hunter2"))


def test_openapi_declares_the_bearer_scheme(settings: Settings) -> None:
    openapi = create_app(settings).openapi()
    assert openapi["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"
    operation = openapi["paths"]["/v1/users/{user_id}/embedding"]["get"]
    assert operation["security"] == [{"APIKey": []}]
    assert "security" not in openapi["paths"]["/readyz"]["get"]
