"""``tuwen`` — the producer commands (submit, result, cancel, delete, status, flower, bulk, gateway, keys).

The model-side commands (worker, demo, train-demo, eval-demo, bench) are added by ``tuwen.workers.cli``,
which composes the whole ``tuwen`` command; this module never imports ``workers``.

Exit codes: 0 ok · 1 the job failed or was cancelled, or there is no such job (for this owner) ·
2 input refused · 3 a service is unavailable · 4 not finished in time.

* ``submit``: 0 queued (or, with ``--wait``, answered) · 1 failed · 2 refused · 3 · 4 (``--wait``).
* ``result``: 0 answered · 1 failed, cancelled or no such job · 3 · 4 still queued or running.
* ``cancel``: 0 cancelled, or running and asked to stop (it finishes) · 1 no such job, or it had already
  ended (nothing to cancel) · 3.
* ``delete``: 0 deleted · 1 no such job · 3.

"No such job" and "another owner's job" (``--owner``) give the same message and exit code, so that the
answer does not tell whether someone else's job exists. User data (ids, answers, paths) is printed
escaped: rich would read ``[...]`` in it as markup.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from tuwen.pipeline.errors import InvalidInput, TuwenError
from tuwen.pipeline.bulk.cli import bulk_app, eval_command
from tuwen.pipeline.gateway.cli import gateway_app, keys_app
from tuwen.pipeline.jobs import no_such_job
from tuwen.pipeline.schema import JobResult, JobStatus
from tuwen.pipeline.settings import Settings

app = typer.Typer(help="tuwen (图文): Chinese visual question answering on a message queue.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(gateway_app, name="gateway")
app.add_typer(bulk_app, name="bulk")
app.command("eval")(eval_command)
app.add_typer(keys_app, name="keys")
console = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

EXIT_FAILED, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 1, 2, 3, 4


def settings_from(**overrides: Any) -> Settings:
    """Settings from the environment, with the command line's explicit options on top. A bad setting
    (e.g. a Redis URL without a scheme, an example secret) is reported in a line each, exit status 2."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for e in exc.errors():
            where = f"TUWEN_{str(e['loc'][0]).upper()}: " if e["loc"] else ""
            message = str(e["msg"]).removeprefix("Value error, ")
            err.print(f"[red]error[/red] invalid_setting: {escape(where + message)}", soft_wrap=True)
        raise typer.Exit(EXIT_REFUSED) from None


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _fail(exc: TuwenError, as_json: bool) -> NoReturn:
    code = EXIT_REFUSED if isinstance(exc, InvalidInput) else EXIT_UNAVAILABLE if exc.retryable else EXIT_FAILED
    if as_json:
        _dump({"status": "refused" if code == EXIT_REFUSED else "error", "error": {**exc.to_dict(),
                                                                                  "retryable": exc.retryable}})
    else:
        err.print(f"[red]error[/red] {escape(exc.code)}: {escape(exc.message)}", soft_wrap=True)
    raise typer.Exit(code)


def _how(result: JobResult) -> str:
    """``812 ms, batch of 8, model`` — or ``from the answer cache`` where no model ran."""
    parts = [f"{result.timings['total_ms']:.0f} ms"]
    if result.cached:
        parts.append("from the answer cache")
    elif result.batch_size is not None:
        parts.append(f"batch of {result.batch_size}")
    if result.model_id:
        parts.append(result.model_id)
    return ", ".join(parts)


def _show(result: JobResult, as_json: bool) -> None:
    if result.status == JobStatus.unknown:
        _fail(no_such_job(result.id), as_json)
    if as_json:
        _dump(result.to_json())
    else:
        console.print(f"[bold]{escape(result.id)}[/bold]  {result.status.value}")
        if result.transcript is not None:
            console.print(f"[dim]heard:[/dim] {escape(result.transcript)}", soft_wrap=True)
        if result.answer is not None:
            console.print(escape(result.answer), soft_wrap=True)
        if result.error is not None:
            console.print(f"[red]{escape(result.error.code)}[/red]: {escape(result.error.message)}", soft_wrap=True)
        if result.timings.get("total_ms") is not None:
            console.print(f"[dim]{escape(_how(result))}[/dim]")
    if result.status in (JobStatus.failed, JobStatus.cancelled):
        raise typer.Exit(EXIT_FAILED)
    if not result.status.terminal:
        raise typer.Exit(EXIT_TIMEOUT)


@app.command()
def submit(
    image: Annotated[Path, typer.Argument(help="picture file (PNG, JPEG, GIF, WebP, BMP, TIFF)")],
    question: Annotated[Optional[str], typer.Argument(help="the question, e.g. 图中有几个圆形？ (may be left out "
                                                      "with --audio)")] = None,
    audio: Annotated[Optional[Path], typer.Option(help="a spoken question (WAV, FLAC, Ogg, MP3), transcribed "
                                                       "first")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="block until the answer is there")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="cap on generated tokens")] = None,
    priority: Annotated[str, typer.Option(help="interactive or bulk")] = "interactive",
    owner: Annotated[str, typer.Option(help="owner of the job")] = "default",
) -> None:
    """Submit one picture and question (typed, or spoken with --audio); prints the job id (or the answer with
    --wait)."""
    from tuwen.pipeline.client import Client

    client = Client(settings_from())
    try:
        job = client.submit(image, question if question is not None or audio is not None else "", audio=audio,
                            max_new_tokens=max_new_tokens, priority=priority, owner=owner)
        if wait:
            _say_if_nobody_consumes(client, priority, spoken=audio is not None)  # at once, not after the whole wait
            job = client.wait(job.id, timeout=timeout, owner=owner)
    except TuwenError as exc:
        _fail(exc, as_json)
    if not wait:
        if as_json:
            _dump(job.to_json())
        else:
            console.print(escape(job.id))
        return
    _show(job, as_json)


@app.command()
def result(
    job_id: str,
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for the job to end (0: do not wait)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    owner: Annotated[Optional[str], typer.Option(help="only show the job if it is this owner's")] = None,
) -> None:
    """Show a job's state and answer."""
    from tuwen.pipeline.client import Client

    client = Client(settings_from())
    try:
        res = client.wait(job_id, timeout=wait, owner=owner) if wait else client.get(job_id, owner)
    except TuwenError as exc:
        _fail(exc, as_json)
    _show(res, as_json)


@app.command()
def cancel(job_id: str, owner: Annotated[Optional[str], typer.Option()] = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Cancel a queued job (a running job finishes)."""
    from tuwen.pipeline.client import Client

    try:
        res = Client(settings_from()).cancel(job_id, owner)
    except TuwenError as exc:
        _fail(exc, as_json)
    if res.status == JobStatus.unknown:
        _fail(no_such_job(job_id), as_json)
    if as_json:
        _dump(res.to_json())
    else:
        console.print(f"{escape(res.id)}  {res.status.value}")
    if res.status in (JobStatus.succeeded, JobStatus.failed):
        err.print(f"the job had already {res.status.value}; nothing was cancelled")
        raise typer.Exit(EXIT_FAILED)


@app.command()
def delete(job_id: str, owner: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Delete a job now: its result, and its image unless another job uses it."""
    from tuwen.pipeline.client import Client

    try:
        found = Client(settings_from()).delete(job_id, owner)
    except TuwenError as exc:
        _fail(exc, False)
    if not found:
        _fail(no_such_job(job_id), False)
    console.print(f"{escape(job_id)}  deleted")


def _say_if_nobody_consumes(client: Any, priority: str, spoken: bool = False) -> None:
    """Before a wait: say on stderr when no live worker consumes the job's queue (and how to start one)."""
    from tuwen.pipeline.app import queue_for
    from tuwen.pipeline.registry import no_consumer_message
    from tuwen.pipeline.schema import Priority

    try:
        queue = client.settings.speech_queue if spoken else queue_for(client.settings, Priority(priority))
        note = no_consumer_message(client.jobs.redis, queue, speech=spoken)
    except Exception:  # noqa: BLE001 - only a hint; the timeout itself is reported anyway
        return
    if note:
        err.print(f"[yellow]{escape(note)}[/yellow]; the job stays queued until one starts", soft_wrap=True)


@app.command()
def status(
    minutes: Annotated[int, typer.Option(help="how many minutes of job counts to show")] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    worker: Annotated[Optional[str], typer.Option(help="only say whether this worker's own heartbeat is live "
                                                      "(exit 0) or not (exit 1): a liveness probe")] = None,
) -> None:
    """One screen: queues and the live workers consuming each, workers, jobs per minute, failures by
    code, refused (dead-letter) messages. Exit status 3 when Redis or the broker is unreachable."""
    from tuwen.pipeline.status import collect, render

    if worker is not None:
        _worker_alive(worker)
    try:
        snapshot = collect(settings_from(), minutes)
    except TuwenError as exc:
        _fail(exc, as_json)
    if as_json:
        _dump(snapshot)
    else:
        console.print(render(snapshot))


def _worker_alive(name: str) -> None:
    """Exit 0 when ``name``'s heartbeat (beaten by its consuming loop, ``registry.TTL_S``) is in Redis, 1
    when not, 3 when Redis is unreachable (a probe then fails too, as the worker cannot work either)."""
    from tuwen.pipeline import registry
    from tuwen.pipeline.jobs import connect, redis_errors

    try:
        with redis_errors():
            beat = connect(settings_from().redis_url).get(registry.KEY + name)
    except TuwenError as exc:
        _fail(exc, False)
    if beat is None:
        err.print(f"no live heartbeat from worker {name}", markup=False)
        raise typer.Exit(1)
    console.print(f"worker {name} is live", markup=False)
    raise typer.Exit(0)


@app.command()
def flower(
    port: Annotated[int, typer.Option()] = 5555,
    address: Annotated[str, typer.Option(help="interface to listen on; 0.0.0.0 exposes it to the network "
                                              "(put a TLS proxy in front)")] = "127.0.0.1",
    basic_auth: Annotated[Optional[str], typer.Option(envvar="FLOWER_BASIC_AUTH", show_envvar=True,
                                                      help="user:password; set FLOWER_BASIC_AUTH rather than "
                                                           "this option, which ps shows")] = None,
) -> None:
    """Start Flower against the configured broker, on this host only unless --address says otherwise.

    The broker URL and the credentials reach Flower through its environment, never its command line
    (which any user can read with ps); Flower stops when this command stops (SIGTERM, SIGINT, or even
    SIGKILL on Linux)."""
    import os
    import signal
    import subprocess

    from tuwen.pipeline.settings import is_placeholder

    settings = settings_from()
    # Flower loads tuwen's own app (tuwen.pipeline.flower_app) from these settings: a Sentinel or TLS broker
    # reaches it as the workers see it. CELERY_BROKER_URL would override the app's broker with the raw URL.
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"} | settings.to_env()
    if basic_auth:
        if is_placeholder(basic_auth.partition(":")[2]):
            _fail(InvalidInput("FLOWER_BASIC_AUTH still has an example password (such as change-me); set a "
                               "real one", code="invalid_setting"), False)
        env["FLOWER_BASIC_AUTH"] = basic_auth
    else:
        err.print("[yellow]warning[/yellow]: Flower without FLOWER_BASIC_AUTH shows every job to anyone who can "
                  "reach it")
    # Workers answer Flower's broadcasts from their consuming loop; one busy decoding may take longer than
    # Flower's 1 s default, and its Workers page then showed none (seen on a loaded 2-core machine).
    cmd = [sys.executable, "-m", "celery", "-A", "tuwen.pipeline.flower_app", "flower", f"--port={port}",
           f"--address={address}", "--inspect_timeout=5000"]
    child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    raise typer.Exit(code)


def _die_with_parent() -> None:
    """In the child, before exec: have Linux send it SIGTERM when its parent dies (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
