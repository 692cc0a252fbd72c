"""``encoder-service versions``: the version lifecycle from a terminal.

Every move is the same registry transaction the admin API runs, recorded with ``--by`` (default
the local user), so the status history says who did what whichever door they used; the audit
log also records the OS user and host behind it, and refusals as well as successes.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from encoder_service.settings import get_settings

app = typer.Typer(help="Inspect and manage published model versions.", no_args_is_help=True)

VersionArg = Annotated[str, typer.Argument(help="Version id.")]
ByOpt = Annotated[
    str | None, typer.Option(help="Who makes the change, for the history (default cli:<user>).")
]
RecentOpt = Annotated[
    float, typer.Option(min=0, help="A read within this many hours counts as recent use.")
]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@contextmanager
def _client() -> Iterator[Any]:
    from encoder_service.redis_connection import resolve_redis_url, sync_client

    with resolve_redis_url(get_settings()) as url:
        yield sync_client(url)


def _by(by: str | None) -> str:
    return by or f"cli:{getpass.getuser()}"


def _move(
    name: str, by: str | None, action: Callable[[Any], dict[str, Any]], target: str = ""
) -> None:
    """Run and audit a registry move, print the resulting status, turn refusals into exit
    code 2."""
    from encoder_service.audit import cli_action
    from encoder_service.registry import Registry, RegistryError

    with _client() as client:
        try:
            with cli_action(client, name, target, actor=_by(by)) as note:
                manifest = action(Registry(client))
                note["target"], note["detail"] = manifest["version"], f"status {manifest['status']}"
        except RegistryError as exc:
            raise _fail(str(exc)) from exc
    last = manifest["status_history"][-1]
    typer.echo(f"{manifest['version']}: {manifest['status']} (by {last['by']} at {last['at']})")


@app.command("list")
def list_versions() -> None:
    """List versions, oldest first; `*` marks the active one."""
    from encoder_service.registry import Registry

    with _client() as client:
        registry = Registry(client)
        manifests, active = registry.list(), registry.active()
    for m in manifests:
        marker = "*" if m["version"] == active else " "
        typer.echo(
            f"{marker} {m['version']:<12} {m['status']:<10} dim={m['embedding_dim']:<4} "
            f"parent={m.get('parent_version') or '-':<8} {m['schema_hash'][:19]}  "
            f"{m['created_at']}"
        )


@app.command()
def show(version: VersionArg) -> None:
    """Print one version's manifest (status history included) as JSON."""
    from encoder_service.registry import Registry

    with _client() as client:
        manifest = Registry(client).get(version)
    if manifest is None:
        raise _fail(f"no such version: {version!r}")
    typer.echo(json.dumps(manifest, indent=2))


@app.command()
def promote(version: VersionArg, by: ByOpt = None) -> None:
    """Make VERSION active atomically; the previous active one becomes deprecated."""
    _move("promote", by, lambda r: r.promote(version, by=_by(by)), version)


@app.command()
def rollback(by: ByOpt = None) -> None:
    """Make the version the active one replaced active again, atomically."""
    _move("rollback", by, lambda r: r.rollback(by=_by(by)))


@app.command()
def deprecate(version: VersionArg, by: ByOpt = None) -> None:
    """Mark VERSION deprecated: still refreshed and served, readers should move."""
    _move("deprecate", by, lambda r: r.deprecate(version, by=_by(by)), version)


@app.command()
def retire(
    version: VersionArg,
    force: Annotated[bool, typer.Option(help="Retire even if readers used it recently.")] = False,
    recent_hours: RecentOpt = 168.0,
    by: ByOpt = None,
) -> None:
    """Stop refreshing and serving VERSION; refused while an API key still reads it."""
    _move(
        "retire",
        by,
        lambda r: r.retire(version, by=_by(by), force=force, recent_seconds=recent_hours * 3600),
        version,
    )


@app.command()
def readers(version: VersionArg, recent_hours: RecentOpt = 168.0) -> None:
    """List the API keys that read VERSION recently, latest first."""
    from encoder_service.registry import Registry

    with _client() as client:
        found = Registry(client).readers(version, since=time.time() - recent_hours * 3600)
    if not found:
        typer.echo(f"no reads of {version} in the last {recent_hours:g} h")
    for r in found:
        when = datetime.fromtimestamp(r.last_read_at, UTC).isoformat(timespec="seconds")
        typer.echo(f"{r.client:<24} {r.reads:>12,} reads  last {when}")


@app.command()
def align(
    source: Annotated[str, typer.Argument(help="The newer version whose embeddings are read.")],
    target: Annotated[str, typer.Argument(help="The version whose space readers expect.")],
    kind: Annotated[str, typer.Option(help="ridge or procrustes.")] = "ridge",
    max_users: Annotated[
        int, typer.Option(min=1, help="Fit on at most this many users.")
    ] = 100_000,
    by: ByOpt = None,
) -> None:
    """Fit and store the map SOURCE -> TARGET, so readers can ask `?version=SOURCE&as=TARGET`."""
    from encoder_service.alignment import AlignmentError, align_versions
    from encoder_service.audit import cli_action
    from encoder_service.registry import RegistryError

    with _client() as client:
        try:
            with cli_action(client, "align", source, actor=_by(by)) as note:
                mapping = align_versions(client, source, target, kind, max_users=max_users)  # type: ignore[arg-type]
                note["detail"] = f"{source} -> {target} ({kind})"
        except (AlignmentError, RegistryError) as exc:
            raise _fail(str(exc)) from exc
    m = mapping.metrics
    typer.echo(
        f"{source} -> {target} ({kind}) on {m['users']} users: held-out R² "
        f"{m['holdout_r2']:.3f}, cosine {m['holdout_cosine']:.3f}"
    )
