"""Pick a loader from command-line options: generic tables, a public data set, or synthetic."""

from __future__ import annotations

from pathlib import Path

from encoder_service.data.tables import Dataset


class SourceError(ValueError):
    """The options name no data source, or more than one."""


def load_source(
    *,
    events: Path | None = None,
    users: Path | None = None,
    items: Path | None = None,
    movielens: Path | None = None,
    ciao: Path | None = None,
    synthetic: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load exactly one of the sources; the generic tables are the documented contract."""
    chosen = [
        name
        for name, value in (
            ("--events", events),
            ("--movielens", movielens),
            ("--ciao", ciao),
            ("--synthetic", synthetic),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        raise SourceError(
            "give exactly one data source: --events (with optional --users/--items), "
            f"--movielens, --ciao or --synthetic (got {', '.join(chosen) or 'none'})"
        )
    if (users or items) and events is None:
        raise SourceError("--users and --items go with --events")
    if events is not None:
        from encoder_service.data.tables import load_tables

        return load_tables(events, users, items)
    if movielens is not None:
        from encoder_service.data.movielens import load_movielens

        return load_movielens(movielens)
    if ciao is not None:
        from encoder_service.data.ciao import load_ciao

        return load_ciao(ciao)
    from encoder_service.data.synthetic import generate

    assert synthetic is not None
    return generate(synthetic, seed=seed)
