"""Ingesting events: validate a batch with the offline input contract, append it to the streams.

Each event is validated on its own by :func:`parse_event`, the rules the offline tables obey, so
one bad event does not cost the batch: the valid ones are appended (``202``) and the refused ones
listed by index with the field and the reason. Only a batch with no valid event at all is refused
as a whole, with the usual ``invalid-request`` problem. ``202`` means appended to the user's
stream, not yet applied: the refresher makes the embedding reflect it, typically within a
fraction of a second.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.responses import Response

from encoder_service.api.deps import Ingester, service_of
from encoder_service.api.problems import (
    BATCH_TOO_LARGE,
    FORBIDDEN,
    INVALID_REQUEST,
    REDIS_UNAVAILABLE,
    UNAUTHENTICATED,
    problem_response,
    problem_responses,
)
from encoder_service.api.responses import JSONBytesResponse
from encoder_service.api.service import BatchTooLargeError
from encoder_service.data.contract import ContractError, Event, parse_event
from encoder_service.events import append_events_async
from encoder_service.settings import Settings

router = APIRouter(prefix="/v1", tags=["events"])


class EventIn(BaseModel):
    """One user event; the same fields and rules as a row of the offline events table."""

    user_id: str = Field(description="1-128 of `A-Z a-z 0-9 _ . : @ -`.", examples=["u42"])
    item_id: str = Field(description="Same alphabet as `user_id`.", examples=["movie-17"])
    timestamp: float | str = Field(
        description="Unix seconds, or an ISO-8601 time (UTC when it has no offset).",
        examples=[1718000000.5, "2024-06-10T08:00:00Z"],
    )
    event_type: str | None = Field(default=None, description="Default `interaction`.")
    weight: float | None = Field(default=None, ge=0, description="Strength or rating; default 1.")
    context: str | None = Field(default=None, description="Device or platform.")
    categories: list[str] | str | None = Field(
        default=None,
        description="The item's categories (a list, or names joined by `|`); used when a model "
        "version does not know the item.",
    )
    profile: dict[str, str | float | bool | None] | None = Field(
        default=None,
        description="Profile fields; they overwrite the user's stored ones. A first event with a "
        "profile gives a new user a meaningful cold-start embedding.",
    )
    idempotency_key: str | None = Field(
        default=None,
        description="A retried event with the same key for the same user is applied once "
        "(remembered for `ENCODER_IDEMPOTENCY_TTL_SECONDS`, default a day).",
    )


# Items are validated one by one by the input contract, not by pydantic, so that a bad event is
# refused alone; the schema still documents the fields.
EventItem = Annotated[Any, WithJsonSchema(EventIn.model_json_schema())]


class EventBatch(BaseModel):
    """Events to ingest; at most `ENCODER_BATCH_LIMIT` (default 1000) of them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "user_id": "u42",
                            "item_id": "movie-17",
                            "timestamp": 1718000000.5,
                            "event_type": "view",
                            "context": "mobile",
                            "profile": {"age": 31, "country": "FR"},
                            "idempotency_key": "u42-view-0001",
                        }
                    ]
                }
            ]
        },
    )

    events: list[EventItem] = Field(min_length=1)


class RefusedEvent(BaseModel):
    index: int = Field(description="Position of the event in the request.")
    field: str | None = Field(description="The field that breaks the contract.")
    reason: str


class IngestResult(BaseModel):
    """How many events were appended, their stream entry ids, and the refused ones."""

    accepted: int
    ids: list[str] = Field(description="Stream entry ids of the accepted events, in order.")
    refused: list[RefusedEvent]


def _validate(raws: list[Any], *, latest: float) -> tuple[list[Event], list[dict[str, Any]]]:
    events: list[Event] = []
    refused: list[dict[str, Any]] = []
    for index, raw in enumerate(raws):
        if not isinstance(raw, dict):
            refused.append({"index": index, "field": None, "reason": "not a JSON object"})
            continue
        try:
            events.append(parse_event(raw, latest=latest))
        except ContractError as exc:
            refused.append({"index": index, "field": exc.field, "reason": exc.reason})
    return events, refused


@router.post(
    "/events",
    status_code=202,
    response_model=IngestResult,
    responses=problem_responses(
        INVALID_REQUEST, BATCH_TOO_LARGE, UNAUTHENTICATED, FORBIDDEN, REDIS_UNAVAILABLE
    ),
)
async def ingest_events(batch: EventBatch, request: Request, _: Ingester) -> Response:
    """Validate events and append the valid ones to their users' streams."""
    settings: Settings = request.app.state.settings
    if len(batch.events) > settings.batch_limit:
        raise BatchTooLargeError(
            f"{len(batch.events)} events in one batch; at most {settings.batch_limit} are allowed",
            limit=settings.batch_limit,
        )
    events, refused = _validate(
        batch.events, latest=time.time() + settings.event_max_future_seconds
    )
    if not events:
        errors = [
            {"loc": ["body", "events", r["index"], r["field"] or ""], "msg": r["reason"]}
            for r in refused
        ]
        return problem_response(
            INVALID_REQUEST,
            "no event in the batch is valid",
            request.url.path,
            errors=[{**e, "type": "contract"} for e in errors],
        )
    ids = await append_events_async(
        service_of(request).client,
        events,
        shards=settings.stream_shards,
        maxlen=settings.stream_maxlen,
    )
    return JSONBytesResponse(
        {"accepted": len(ids), "ids": ids, "refused": refused}, status_code=202
    )
