"""The API suite's fixtures (published catalog, settings), reused by the security tests."""

from tests.api.conftest import catalog, settings

__all__ = ["catalog", "settings"]
