"""The ``encoder-service`` command line.

Training modules import torch, so they are imported inside the commands that need them: ``serve``
and the read-only commands start without torch installed.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from encoder_service.audit import cli_action
from encoder_service.data.contract import ContractError
from encoder_service.refresher.cli import deadletters_app, refresh
from encoder_service.settings import Settings, get_settings
from encoder_service.versions_cli import app as versions_app

app = typer.Typer(
    help="Learn one dense embedding per user, publish it to Redis, serve and refresh it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(versions_app, name="versions")
app.command()(refresh)
app.add_typer(deadletters_app, name="deadletters")
keys_app = typer.Typer(help="Create API keys for the REST API.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

log = logging.getLogger("encoder_service")

EventsOpt = Annotated[Path | None, typer.Option(help="Events table (CSV or Parquet).")]
UsersOpt = Annotated[Path | None, typer.Option(help="Users table with profile fields.")]
ItemsOpt = Annotated[Path | None, typer.Option(help="Items table with categories/vectors.")]
MovielensOpt = Annotated[
    Path | None, typer.Option(help="A MovieLens 100K or 1M folder (converted on the fly).")
]
CiaoOpt = Annotated[Path | None, typer.Option(help="A Ciao folder (converted on the fly).")]
SyntheticOpt = Annotated[int | None, typer.Option(help="Generate this many synthetic users.")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@app.callback()
def main(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="Synthetic users to generate.")] = 5000,
    version: Annotated[str, typer.Option(help="Version id to publish as.")] = "v1",
    epochs: Annotated[int, typer.Option(help="Training epochs (early stopping applies).")] = 15,
) -> None:
    """Generate data, train, export to ONNX and publish v1 to the embedded (or REDIS_URL) store."""
    settings = get_settings()
    _train_and_publish(
        settings,
        source={"synthetic": users},
        version=version,
        epochs=epochs,
        exclude_profile=[],
        publish=True,
        activate=None,
    )


@app.command()
def train(
    events: EventsOpt = None,
    users: UsersOpt = None,
    items: ItemsOpt = None,
    movielens: MovielensOpt = None,
    ciao: CiaoOpt = None,
    synthetic: SyntheticOpt = None,
    version: Annotated[str, typer.Option(help="Version id of the new model.")] = "v1",
    epochs: Annotated[int, typer.Option(help="Most training epochs.")] = 30,
    exclude_profile: Annotated[
        list[str] | None,
        typer.Option(help="Profile field to leave out of the features (repeatable), e.g. a label."),
    ] = None,
    publish: Annotated[bool, typer.Option(help="Publish the training snapshot to Redis.")] = True,
    activate: Annotated[
        bool | None, typer.Option(help="Make it the active version (default: if none is).")
    ] = None,
) -> None:
    """Train the autoencoder on a data set, export it to ONNX and (by default) publish it.

    Runs as is under `torchrun --nproc-per-node=N` (DistributedDataParallel; docs/scaling.md).
    """
    _train_and_publish(
        get_settings(),
        source={
            "events": events,
            "users": users,
            "items": items,
            "movielens": movielens,
            "ciao": ciao,
            "synthetic": synthetic,
        },
        version=version,
        epochs=epochs,
        exclude_profile=exclude_profile or [],
        publish=publish,
        activate=activate,
    )


def _train_and_publish(
    settings: Settings,
    *,
    source: dict[str, object],
    version: str,
    epochs: int,
    exclude_profile: list[str],
    publish: bool,
    activate: bool | None,
) -> None:
    try:
        from encoder_service.data.sources import SourceError, load_source
        from encoder_service.training import distributed
        from encoder_service.training.pipeline import train_version
        from encoder_service.training.train import TrainConfig
    except ImportError as exc:
        raise _fail(
            f"training needs the 'train' extra ({exc.name} is missing): "
            "pip install 'encoder-service[train]'"
        ) from exc
    # Under torchrun every rank runs this whole function; rank 0 alone prints.
    with distributed.launched() as world:
        echo = typer.echo if world.is_main else _quiet
        try:
            dataset = load_source(seed=settings.seed, **source)  # type: ignore[arg-type]
        except (ContractError, SourceError, FileNotFoundError) as exc:
            raise _fail(str(exc)) from exc
        for warning in dataset.warnings:
            log.warning("%s", warning)
        echo(
            f"data {dataset.name}: {len(dataset.users)} users, {len(dataset.events)} events, "
            f"{len(dataset.items)} items"
        )
        config = TrainConfig(
            embedding_dim=settings.embedding_dim,
            epochs=epochs,
            seed=settings.seed,
            item_weight=settings.item_set_weight,
            item_set_target=settings.item_set_target,
            max_branch_width=settings.max_branch_width,
            ensemble_size=settings.ensemble_size,
        )
        trained = train_version(
            dataset,
            version=version,
            out_dir=settings.home / "models",
            config=config,
            popularity_bins=settings.popularity_bins,
            item_vector_dim=settings.item_vector_dim,
            exclude_profile=exclude_profile,
        )
        metrics = trained.manifest["metrics"]
        echo(
            f"trained {version}: val loss {metrics['val_loss']:.4f}, ONNX parity "
            f"{metrics['onnx_parity_max_abs_diff']:.2e}; model in {trained.folder}"
        )
        if not publish:
            return
        from encoder_service.publish import StoreFullError
        from encoder_service.redis_connection import resolve_redis_url, sync_client

        if _spans_machines(world.size) and not settings.redis_url:
            raise _fail("a training job over several machines publishes to REDIS_URL; set it")
        with resolve_redis_url(settings) as url:
            client = sync_client(url)
            # Every rank writes its share; rank 0 alone registers, so it alone is audited.
            audited = cli_action(client, "publish", version) if world.is_main else nullcontext({})
            try:
                with audited as note:
                    report = distributed.publish_snapshot(
                        client,
                        trained,
                        activate=activate,
                        batch_size=settings.publish_batch_size,
                    )
                    note["detail"] = f"{report.users} users; active {report.active}"
            except StoreFullError as exc:
                raise _fail(str(exc)) from exc
            sample = trained.user_ids[0]
            echo(
                f"published {report.users} users as {report.version} into {url} "
                f"({report.users_per_second:,.0f} users/s); active version: {report.active}\n"
                f"read one:  encoder-service get {sample} --version {report.version}\n"
                f"serve:     ENCODER_AUTH_MODE=none encoder-service serve   then   "
                f"curl localhost:{settings.api_port}/v1/users/{sample}/embedding"
            )


def _quiet(message: str) -> None:
    """Where the console output of torchrun ranks other than 0 goes."""


def _spans_machines(world_size: int) -> bool:
    """True when torchrun placed this job's processes on more than one machine, where each
    would otherwise start its own embedded Valkey."""
    return world_size > int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


@app.command("publish")
def publish_command(
    model_dir: Annotated[Path, typer.Argument(help="A trained version folder (manifest.json).")],
    activate: Annotated[
        bool | None, typer.Option(help="Make it the active version (default: if none is).")
    ] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Processes that encode and write slices of the users.")
    ] = 1,
) -> None:
    """Publish a trained version for every user whose feature state is live in Redis."""
    from encoder_service.encoder import ModelArtifacts
    from encoder_service.publish import StoreFullError, publish_from_live_states
    from encoder_service.redis_connection import resolve_redis_url, sync_client

    settings = get_settings()
    try:
        artifacts = ModelArtifacts.from_folder(model_dir)
    except FileNotFoundError as exc:
        raise _fail(f"{model_dir} is not a model version folder: {exc.filename} missing") from exc
    with resolve_redis_url(settings) as url:
        client = sync_client(url)
        try:
            with cli_action(client, "publish", artifacts.manifest["version"]) as note:
                report = publish_from_live_states(
                    client,
                    artifacts,
                    activate=activate,
                    batch_size=settings.publish_batch_size,
                    processes=processes,
                    redis_url=url,
                )
                note["detail"] = f"{report.users} users; active {report.active}"
        except StoreFullError as exc:
            raise _fail(str(exc)) from exc
    typer.echo(f"published {report.users} users as {report.version}; active: {report.active}")


@app.command()
def get(
    user_id: Annotated[str, typer.Argument(help="The user whose embedding to print.")],
    version: Annotated[str | None, typer.Option(help="Version; default the active one.")] = None,
) -> None:
    """Print one user's embedding straight from Redis (no API needed)."""
    from encoder_service.redis_connection import resolve_redis_url, sync_client
    from encoder_service.registry import Registry
    from encoder_service.store import EmbeddingStore, decode_embedding

    settings = get_settings()
    with resolve_redis_url(settings) as url:
        client = sync_client(url)
        registry = Registry(client)
        chosen = version or registry.active()
        manifest = registry.get(chosen) if chosen else None
        if manifest is None or not chosen:
            raise _fail(f"no such version: {chosen!r}" if chosen else "no active version")
        (raw,) = EmbeddingStore(client).read_embeddings(chosen, [user_id])
    if raw is None:
        raise _fail(f"user {user_id!r} has no embedding in version {chosen!r}")
    vector = decode_embedding(raw, manifest["embedding_dim"], manifest["dtype"])
    typer.echo(
        f"user {user_id} version {chosen} dim {len(vector)}\n"
        + np.array2string(vector, precision=4, max_line_width=100)
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (ENCODER_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (ENCODER_API_PORT).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn worker processes (ENCODER_API_WORKERS).")
    ] = None,
) -> None:
    """Serve embeddings over REST (uvicorn) from the configured or embedded Redis."""
    from encoder_service.api.server import run

    settings = get_settings()
    run(
        settings,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers or settings.api_workers,
    )


def _backup_module() -> Any:
    try:
        from encoder_service import backup
    except ImportError as exc:
        raise _fail(
            f"backup and restore need the 'backup' extra ({exc.name} is missing): "
            "pip install 'encoder-service[backup]'"
        ) from exc
    return backup


ChunkOpt = Annotated[int, typer.Option(min=1, help="Users per SCAN/MGET and read batch.")]


@app.command("export")
def export_command(
    version: Annotated[str, typer.Argument(help="The version to back up.")],
    folder: Annotated[Path, typer.Argument(help="A new (or empty) folder for the backup.")],
    chunk_size: ChunkOpt = 1000,
) -> None:
    """Back up a version (embeddings, feature states, meta, manifest, model, alignment maps)
    to Parquet files in FOLDER."""
    backup = _backup_module()
    from encoder_service.redis_connection import resolve_redis_url, sync_client

    with resolve_redis_url(get_settings()) as url:
        client = sync_client(url)
        try:
            with cli_action(client, "export", version) as note:
                report = backup.export_version(client, version, folder, chunk_size=chunk_size)
                note["detail"] = f"{report.users} users to {folder}"
        except (ValueError, FileExistsError) as exc:
            raise _fail(str(exc)) from exc
    typer.echo(
        f"exported {report.version}: {report.users} users ({report.embeddings} embeddings, "
        f"{report.states} states){' [active]' if report.was_active else ''} to {folder}"
    )


@app.command("import")
def import_command(
    folder: Annotated[Path, typer.Argument(help="A folder written by `encoder-service export`.")],
    force: Annotated[
        bool, typer.Option(help="Replace the version if the target already has it.")
    ] = False,
    replace_states: Annotated[
        bool, typer.Option(help="Overwrite feature states the target already has.")
    ] = False,
    chunk_size: ChunkOpt = 1000,
) -> None:
    """Restore a backup into the configured Redis; every value is read back and compared."""
    backup = _backup_module()
    from encoder_service.redis_connection import resolve_redis_url, sync_client

    actor = f"cli:{getpass.getuser()}"
    with resolve_redis_url(get_settings()) as url:
        client = sync_client(url)
        try:
            with cli_action(client, "import", backup.peek_version(folder)) as note:
                report = backup.import_version(
                    client,
                    folder,
                    force=force,
                    replace_states=replace_states,
                    by=actor,
                    chunk_size=chunk_size,
                )
                note["detail"] = f"{report.users} users from {folder}; status {report.status}"
        except (ValueError, OSError) as exc:
            raise _fail(str(exc)) from exc
    typer.echo(
        f"imported {report.version} ({report.status}"
        f"{', active' if report.activated else ''}): {report.users} users, "
        f"{report.embeddings} embeddings, {report.states_written} states written; "
        "every value verified"
    )
    for note_text in report.notes:
        typer.echo(f"note: {note_text}")


@app.command()
def audit(
    limit: Annotated[int, typer.Option(min=1, help="Most entries, newest first.")] = 50,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. promote.")] = None,
    actor: Annotated[str | None, typer.Option(help="Only this key name or CLI user.")] = None,
    version: Annotated[str | None, typer.Option(help="Only actions on this version.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List the audit log of admin actions (API and command line), newest first."""
    from encoder_service.audit import AuditLog
    from encoder_service.redis_connection import resolve_redis_url, sync_client

    with resolve_redis_url(get_settings()) as url:
        entries = AuditLog(sync_client(url)).list(limit, action=action, actor=actor, target=version)
    for e in entries:
        if as_json:
            typer.echo(json.dumps(e.as_dict()))
            continue
        when = datetime.fromtimestamp(e.at, UTC).isoformat(timespec="seconds")
        typer.echo(
            f"{when}  {e.via:<3} {e.actor:<20} {e.action:<10} {e.target or '-':<12} "
            f"{e.outcome:<7} {e.origin}  {e.detail}"
        )


ScopeOpt = Annotated[
    list[str] | None, typer.Option(help="read, ingest or admin (repeatable; default read).")
]
KEYS_HINT = "append to ENCODER_API_KEYS (comma-separated) or to the ENCODER_API_KEYS_FILE file"


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="Who holds the key (appears in logs and metrics).")],
    scope: ScopeOpt = None,
) -> None:
    """Create an API key: prints the key (give it to the caller) and its salted config entry."""
    from encoder_service.api.auth import new_api_key

    try:
        key, entry = new_api_key(name, scope or ["read"])
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"key:   {key}\nentry: {entry}   ({KEYS_HINT})")


@keys_app.command("hash")
def keys_hash(
    name: Annotated[str, typer.Argument(help="Who holds the key.")],
    scope: ScopeOpt = None,
) -> None:
    """Read an existing key from standard input and print its salted config entry.

    This migrates an older unsalted entry without handing out a new key. The key is read from
    standard input, never from the command line, so it stays out of shell history and `ps`.
    """
    from encoder_service.api.auth import api_key_entry

    key = typer.get_text_stream("stdin").readline().strip()
    if not key:
        raise _fail("no key on standard input: pipe it in, e.g. `keys hash NAME < keyfile`")
    try:
        entry = api_key_entry(name, scope or ["read"], key)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"entry: {entry}   ({KEYS_HINT})")


if __name__ == "__main__":
    app()
