"""The refresher's Prometheus metrics; freshness is the headline.

Two lags are kept per version because they answer different questions. ``event_lag`` runs from
the event's own ``timestamp`` to the commit that made it readable: what a product sees, but it
includes the producer's delay and any clock skew. ``append_lag`` runs from the moment Redis
accepted the entry (the milliseconds of its stream id, on the server's clock) to the commit:
what this service controls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis
from prometheus_client import Counter, Gauge, Histogram

from encoder_service.refresher.commit import CommitResult, parse_id
from encoder_service.refresher.deadletter import DEAD_LETTER_KEY

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 512, 1024, 2048)

EVENT_LAG = Histogram(
    "encoder_refresh_event_lag_seconds",
    "Event timestamp to the commit making its user's new embedding readable, per version.",
    ["version"],
    buckets=LAG_BUCKETS,
)
APPEND_LAG = Histogram(
    "encoder_refresh_append_lag_seconds",
    "Stream append (entry id time) to the commit making the new embedding readable, per version.",
    ["version"],
    buckets=LAG_BUCKETS,
)
EVENTS = Counter(
    "encoder_refresh_events_total",
    "Stream entries resolved, by outcome: applied, duplicate (acked, not applied again), "
    "dead_letter, trimmed (gone from the stream before it was read).",
    ["outcome"],
)
USERS_ENCODED = Counter(
    "encoder_refresh_users_encoded_total",
    "Users re-encoded (under every live version); below applied events when batches coalesce.",
)
BATCH_SIZE = Histogram(
    "encoder_refresh_batch_entries", "Stream entries per committed batch.", buckets=BATCH_BUCKETS
)
BATCH_SECONDS = Histogram(
    "encoder_refresh_batch_seconds",
    "Time to apply, encode and commit one batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CONFLICTS = Counter(
    "encoder_refresh_commit_conflicts_total",
    "Commits retried because another consumer changed one of the batch's users (WATCH).",
)
FAILURES = Counter(
    "encoder_refresh_failures_total",
    "Batches, users or loop iterations that raised, by exception class; entries stay pending.",
    ["error"],
)
BORROWED = Counter(
    "encoder_refresh_borrowed_total",
    "Older pending entries of a batch's users resolved from outside the batch (another "
    "consumer's, or earlier failures), so that each user's events apply in order.",
)
PENDING = Gauge(
    "encoder_refresh_pending_entries",
    "Entries delivered to the group but not acknowledged yet, per stream.",
    ["stream"],
)
GROUP_LAG = Gauge(
    "encoder_refresh_group_lag_entries",
    "Entries appended to the stream but not yet delivered to the group, per stream.",
    ["stream"],
)
DEAD_LETTERS = Gauge("encoder_refresh_dead_letters", "Entries in the dead-letter stream.")
LIVE_VERSIONS = Gauge("encoder_refresh_live_versions", "Live versions the refresher keeps fresh.")


def record_commit(
    result: CommitResult, versions: Iterable[str], entries: int, seconds: float
) -> None:
    """Count a committed batch and observe both lags of each applied event, per version."""
    EVENTS.labels("applied").inc(len(result.applied))
    EVENTS.labels("duplicate").inc(len(result.duplicates))
    EVENTS.labels("dead_letter").inc(len(result.dead))
    EVENTS.labels("trimmed").inc(result.trimmed)
    BORROWED.inc(len(result.borrowed))
    USERS_ENCODED.inc(len(result.users))
    CONFLICTS.inc(result.conflicts)
    BATCH_SIZE.observe(entries)
    BATCH_SECONDS.observe(seconds)
    committed = result.committed_at
    event_lags = [committed - e.event.timestamp for e in result.applied]
    append_lags = [committed - parse_id(e.entry_id)[0] / 1000 for e in result.applied]
    for version in versions:
        event_series, append_series = EVENT_LAG.labels(version), APPEND_LAG.labels(version)
        for lag in event_lags:
            event_series.observe(lag)
        for lag in append_lags:
            append_series.observe(lag)


def observe_group(
    client: redis.Redis, group: str, streams: Sequence[str]
) -> dict[str, dict[str, int | None]]:
    """Read the group's pending and lag per stream and the dead-letter count; set the gauges.

    Returns stream -> ``{"pending", "lag"}``; None where Redis cannot tell (no such stream or
    group yet, or a lag it cannot compute after entries were deleted).
    """
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    pipe.xlen(DEAD_LETTER_KEY)
    *infos, dead = pipe.execute(raise_on_error=False)
    status: dict[str, dict[str, int | None]] = {}
    for stream, info in zip(streams, infos, strict=True):
        found = {} if isinstance(info, Exception) else _group(info, group)
        status[stream] = {"pending": found.get("pending"), "lag": found.get("lag")}
        for gauge, value in ((PENDING, found.get("pending")), (GROUP_LAG, found.get("lag"))):
            if value is not None:
                gauge.labels(stream).set(value)
    if not isinstance(dead, Exception):
        DEAD_LETTERS.set(dead)
    return status


def _group(groups: list[dict], group: str) -> dict:
    name = group.encode()
    return next((g for g in groups if g["name"] == name), {})
