"""``tuwen gateway serve`` and ``tuwen keys create|list|revoke`` (mounted by ``tuwen.pipeline.cli``).

FastAPI and uvicorn are imported inside ``serve`` only, so the rest of the CLI stays light.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Annotated, Optional

import typer
from rich.console import Console

from tuwen.pipeline.gateway.apikeys import ApiKey, KeyStore
from tuwen.pipeline.errors import TuwenError
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.settings import Settings

gateway_app = typer.Typer(help="The HTTP gateway for web backends.", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="API keys of the HTTP gateway (stored hashed in Redis).", no_args_is_help=True,
                       add_completion=False)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@gateway_app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="[TUWEN_GATEWAY_HOST]")] = None,
    port: Annotated[Optional[int], typer.Option(help="[TUWEN_GATEWAY_PORT]")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the HTTP API (and deliver webhooks) with uvicorn, with read deadlines and a connection cap
    (TUWEN_GATEWAY_HEADER_TIMEOUT_S, TUWEN_GATEWAY_BODY_TIMEOUT_S, TUWEN_GATEWAY_MAX_CONNECTIONS)."""
    import uvicorn

    from tuwen.pipeline.gateway.server import log_config, server_options
    from tuwen.pipeline.gateway.settings import GatewaySettings

    overrides: dict[str, Any] = {k: v for k, v in {"gateway_host": host, "gateway_port": port}.items() if v is not None}
    gw = GatewaySettings(**overrides)
    uvicorn.run("tuwen.pipeline.gateway.app:app_from_env", factory=True, workers=workers, log_level=log_level,
                log_config=log_config(log_level), **server_options(gw))


def _store() -> KeyStore:
    return KeyStore(connect(Settings().redis_url))


def _dump(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _fail(exc: TuwenError) -> None:
    err.print(f"[red]error[/red] {exc.code}: {exc.message}")
    raise typer.Exit(2 if not exc.retryable else 3)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@keys_app.command()
def create(
    owner: Annotated[str, typer.Option(help="who the key's jobs belong to, e.g. school-a")],
    name: Annotated[str, typer.Option(help="a note, e.g. 'web backend prod'")] = "",
    rate_limit: Annotated[Optional[int], typer.Option(help="requests/minute (0: unlimited; default: "
                                                           "TUWEN_RATE_LIMIT_PER_MINUTE)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a key; the token is printed once and cannot be shown again."""
    try:
        key, token = _store().create(owner, name, rate_limit)
    except TuwenError as exc:
        _fail(exc)
    if as_json:
        _dump({**key.to_json(), "token": token})
    else:
        console.print(f"key {key.id} for owner {key.owner}; token (shown once):")
        sys.stdout.write(token + "\n")


@keys_app.command("list")
def list_keys(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (ids, owners, state); tokens are never stored, so never shown."""
    try:
        keys: list[ApiKey] = _store().list()
    except TuwenError as exc:
        _fail(exc)
    if as_json:
        _dump([k.to_json() for k in keys])
        return
    for k in keys:
        state = "active" if k.active else f"revoked {_when(k.revoked_at)}"
        limit = "default" if k.rate_limit_per_minute is None else str(k.rate_limit_per_minute)
        console.print(f"{k.id}  {k.owner:<20} {state:<24} created {_when(k.created_at)}  "
                      f"last used {_when(k.last_used_at)}  rate {limit}/min  {k.name}", markup=False)


@keys_app.command()
def revoke(key_id: str) -> None:
    """Revoke a key at once (requests with it get 401)."""
    try:
        key = _store().revoke(key_id)
    except TuwenError as exc:
        _fail(exc)
    console.print(f"revoked {key.id} (owner {key.owner})")
