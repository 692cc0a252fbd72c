"""Property-based fuzzing of the app's own OpenAPI document against a live server: no 5xx, and
every answer conforms to the schema (status codes, media types, headers, bodies)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from encoder_service.api.app import create_app
from encoder_service.settings import Settings
from tests.api.conftest import Catalog, bearer, live_server, make_settings

# The document does not depend on where Redis is; the live server below uses the test one.
schema = schemathesis.openapi.from_dict(create_app(make_settings("redis://unused")).openapi())


@pytest.fixture
def base_url(settings: Settings, catalog: Catalog) -> Iterator[str]:
    with live_server(create_app(settings)) as url:
        yield url


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api(case: schemathesis.Case, base_url: str) -> None:
    # Unknown query parameters are ignored by design (the HTTP convention; clients add cache
    # busters), which the negative-data check counts as accepting invalid input. Refusals of
    # invalid ids, bodies and sizes have their own tests (test_errors.py, reliability/).
    case.call_and_validate(
        base_url=base_url,
        headers=bearer("read"),
        excluded_checks=[schemathesis.checks.negative_data_rejection],
    )
