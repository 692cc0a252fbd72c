"""Dependencies as ``Annotated`` aliases, so that an endpoint's signature reads as a sentence.

Every dependency is ``async def``: a plain ``def`` would be run in the thread pool, which costs
more than the work it does. FastAPI spends tens of microseconds solving each dependency, so the
embedding routes, the hot path, fetch the service with :func:`service_of` instead of
``ServiceDep``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from encoder_service.api.auth import Principal, require_scope
from encoder_service.api.service import EmbeddingService


def service_of(request: Request) -> EmbeddingService:
    """The service the app's lifespan created."""
    return request.app.state.service  # type: ignore[no-any-return]


async def get_service(request: Request) -> EmbeddingService:
    return service_of(request)


ServiceDep = Annotated[EmbeddingService, Depends(get_service)]
Reader = Annotated[Principal, Depends(require_scope("read"))]
Ingester = Annotated[Principal, Depends(require_scope("ingest"))]
Admin = Annotated[Principal, Depends(require_scope("admin"))]
