"""The hot-path middleware answers exactly what the FastAPI route answers."""

from __future__ import annotations

import pytest

from encoder_service.api.app import create_app
from encoder_service.settings import Settings
from tests.api.conftest import Catalog, api_client, bearer

# An Accept the fast path does not special-case goes through FastAPI's route.
SLOW_JSON = "application/json;q=0.9"


@pytest.mark.parametrize("query", ["", "?version=v1", "?version=v2"])
async def test_fast_and_slow_json_answers_are_identical(
    settings: Settings, catalog: Catalog, query: str
) -> None:
    async with api_client(create_app(settings), "asgi", bearer("read")) as client:
        for user in catalog.users("v1")[:5]:
            url = f"/v1/users/{user}/embedding{query}"
            fast = await client.get(url)
            slow = await client.get(url, headers={"Accept": SLOW_JSON})
            assert fast.status_code == slow.status_code == 200
            assert fast.json() == slow.json()
            assert fast.headers["content-type"] == slow.headers["content-type"]


async def test_fast_binary_answer_matches_the_slow_one(
    settings: Settings, catalog: Catalog
) -> None:
    async with api_client(create_app(settings), "asgi", bearer("read")) as client:
        user = catalog.users("v1")[0]
        fast = await client.get(
            f"/v1/users/{user}/embedding", headers={"Accept": "application/octet-stream"}
        )
        slow = await client.get(
            f"/v1/users/{user}/embedding", headers={"Accept": "application/octet-stream;q=0.9"}
        )
        assert fast.content == slow.content
        for header in ("x-embedding-version", "x-embedding-dim", "x-embedding-updated-at"):
            assert fast.headers[header] == slow.headers[header]


async def test_fast_answers_are_counted_under_the_route_template(
    settings: Settings, catalog: Catalog
) -> None:
    async with api_client(create_app(settings), "asgi", bearer("read")) as client:
        await client.get(f"/v1/users/{catalog.users('v1')[0]}/embedding")
        text = (await client.get("/metrics")).text
    assert 'route="/v1/users/{user_id}/embedding"' in text
    assert 'version="v1"' in text
