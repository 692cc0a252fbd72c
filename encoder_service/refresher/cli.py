"""The refresher's commands: ``refresh`` (the worker) and ``deadletters list|replay``.

Mounted by the main ``encoder-service`` command line; ``python -m encoder_service.refresher.cli``
runs them on their own. Imports beyond typer happen inside the commands, so that the main
command line starts fast whichever command it runs.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Annotated

import orjson
import typer

from encoder_service.settings import get_settings

log = logging.getLogger(__name__)

app = typer.Typer(
    help="Keep embeddings fresh from the event streams.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
deadletters_app = typer.Typer(
    help="Inspect and replay events the refresher refused (the `events:dead` stream).",
    no_args_is_help=True,
)
app.add_typer(deadletters_app, name="deadletters")


@app.command()
def refresh(
    shards: Annotated[
        int | None, typer.Option(min=1, help="Event stream shards (ENCODER_STREAM_SHARDS).")
    ] = None,
    consumer: Annotated[
        str | None,
        typer.Option(help="Consumer name in the group (ENCODER_CONSUMER_NAME; default host-pid)."),
    ] = None,
    consume: Annotated[
        list[int] | None,
        typer.Option(
            min=0,
            help="A shard this process reads (repeatable); default all. Run one process per "
            "set of shards to scale out with each user pinned to one process.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, help="Port of /metrics and /readyz; 0 = none (ENCODER_REFRESHER_METRICS_PORT)."
        ),
    ] = None,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Run this many refresher processes, the shards split among them (needs at "
            "least as many shards); process k is consumer <consumer>-k with metrics on port+k.",
        ),
    ] = 1,
) -> None:
    """Apply streamed events to feature states and re-encode every live version, until stopped."""
    from encoder_service.redis_connection import resolve_redis_url, sync_client
    from encoder_service.refresher.consumer import Refresher, RefresherConfig
    from encoder_service.refresher.health import HealthServer
    from encoder_service.refresher.models import LiveVersions
    from encoder_service.refresher.supervisor import assign_shards, child_commands, supervise

    settings = get_settings()
    try:
        config = RefresherConfig.from_settings(
            settings, shards=shards, consumer=consumer, consume=tuple(consume or ())
        )
        groups = assign_shards(config.shards, config.consume, processes)
    except ValueError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from exc
    port = settings.refresher_metrics_port if metrics_port is None else metrics_port
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if processes > 1:
        log.info("running %d refresher processes over shards %s", processes, groups)
        commands = child_commands(
            groups, shards=config.shards, consumer=config.consumer, metrics_port=port
        )
        supervise(commands, stop)
        log.info("refresher processes stopped")
        return
    with resolve_redis_url(settings) as url:
        client = sync_client(url)
        versions = LiveVersions(client, poll_seconds=settings.registry_poll_seconds)
        health = None
        if port:
            health = HealthServer(
                client,
                group=config.group,
                streams=config.streams,
                versions=versions,
                host=settings.refresher_metrics_host,
                port=port,
            ).start()
            log.info("metrics and readiness on %s:%d", settings.refresher_metrics_host, port)
        log.info(
            "refreshing %s as %s in group %s",
            ", ".join(config.streams),
            config.consumer,
            config.group,
        )
        try:
            Refresher(client, config, versions).run(stop)
        finally:
            if health is not None:
                health.stop()
    log.info("refresher stopped")


@deadletters_app.command("list")
def deadletters_list(
    count: Annotated[int, typer.Option(min=1, help="Most entries to print.")] = 20,
    after: Annotated[str, typer.Option(help="Print entries after this dead-letter id.")] = "-",
) -> None:
    """Print dead letters, oldest first: id, deliveries, reason, and the original fields."""
    from encoder_service.redis_connection import resolve_redis_url, sync_client
    from encoder_service.refresher.deadletter import count_dead_letters, list_dead_letters

    with resolve_redis_url(get_settings()) as url:
        client = sync_client(url)
        total = count_dead_letters(client)
        letters = list_dead_letters(client, count=count, after=after)
    typer.echo(f"{total} dead letter(s)")
    for d in letters:
        where = f" field {d.field}" if d.field else ""
        typer.echo(
            f"{d.dead_id}  from {d.stream} {d.entry_id}  deliveries {d.deliveries}{where}: "
            f"{d.reason}\n    {orjson.dumps(d.fields).decode()}"
        )


@deadletters_app.command("replay")
def deadletters_replay(
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Dead-letter id to replay (repeatable).")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Append dead letters to their user's stream again (after a fix) and remove them here."""
    from encoder_service.audit import cli_action
    from encoder_service.redis_connection import resolve_redis_url, sync_client
    from encoder_service.refresher.deadletter import replay

    if bool(ids) == replay_all:
        typer.secho("error: give --id (one or more) or --all", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2)
    settings = get_settings()
    with resolve_redis_url(settings) as url:
        client = sync_client(url)
        try:
            with cli_action(client, "deadletters-replay", "") as note:
                moved = replay(
                    client,
                    ids=None if replay_all else ids,
                    shards=settings.stream_shards,
                    maxlen=settings.stream_maxlen,
                )
                shown = " ".join(dead_id for dead_id, _ in moved[:20])
                note["detail"] = (
                    f"{len(moved)} replayed: {shown}{' ...' if len(moved) > 20 else ''}"
                )
        except ValueError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=2) from exc
    for dead_id, new_id in moved:
        typer.echo(f"{dead_id} -> {new_id}")
    typer.echo(f"replayed {len(moved)} dead letter(s)")


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()
