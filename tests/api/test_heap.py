"""The API's workers keep their start-up objects out of the garbage collector's scans."""

from __future__ import annotations

import gc

from encoder_service.api.app import create_app
from encoder_service.settings import Settings
from tests.api.conftest import Catalog, api_client, bearer


async def test_the_startup_heap_is_frozen_while_the_app_runs(
    settings: Settings, catalog: Catalog
) -> None:
    # Full collections scanning the long-lived start-up objects were the tail-latency pauses.
    assert gc.get_freeze_count() == 0
    async with api_client(create_app(settings), "asgi", bearer("read")) as client:
        assert gc.get_freeze_count() > 1000
        assert (await client.get("/v1/users/u1/embedding")).status_code == 200
    assert gc.get_freeze_count() == 0  # an app run in-process gives its host's heap back
