"""``tuwen`` — the producer commands (submit, result, cancel, delete, status, flower, bulk, gateway, keys).

The model-side commands (worker, demo, train-demo, eval-demo, bench) are added by ``tuwen.workers.cli``,
which composes the whole ``tuwen`` command; this module never imports ``workers``.

Exit codes: 0 ok · 1 the job failed · 2 input refused · 3 a service is unavailable · 4 not finished
in time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from tuwen.pipeline.errors import InvalidInput, TuwenError
from tuwen.pipeline.bulk_cli import bulk_app, eval_command
from tuwen.pipeline.gateway_cli import gateway_app, keys_app
from tuwen.pipeline.schema import JobResult, JobStatus
from tuwen.pipeline.settings import Settings

app = typer.Typer(help="tuwen (图文): Chinese visual question answering on a message queue.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(gateway_app, name="gateway")
app.add_typer(bulk_app, name="bulk")
app.command("eval")(eval_command)
app.add_typer(keys_app, name="keys")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 1, 2, 3, 4


def settings_from(**overrides: Any) -> Settings:
    """Settings from the environment, with the command line's explicit options on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _fail(exc: TuwenError, as_json: bool) -> None:
    code = EXIT_REFUSED if isinstance(exc, InvalidInput) else EXIT_UNAVAILABLE if exc.retryable else EXIT_FAILED
    if as_json:
        _dump({"status": "refused" if code == EXIT_REFUSED else "error", "error": {**exc.to_dict(),
                                                                                  "retryable": exc.retryable}})
    else:
        err.print(f"[red]error[/red] {exc.code}: {exc.message}")
    raise typer.Exit(code)


def _show(result: JobResult, as_json: bool) -> None:
    if as_json:
        _dump(result.to_json())
    else:
        console.print(f"[bold]{result.id}[/bold]  {result.status.value}")
        if result.answer is not None:
            console.print(result.answer)
        if result.error is not None:
            console.print(f"[red]{result.error.code}[/red]: {result.error.message}")
        if result.timings.get("total_ms") is not None:
            console.print(f"[dim]{result.timings['total_ms']:.0f} ms, batch of {result.batch_size}, "
                          f"{result.model_id}[/dim]")
    if result.status in (JobStatus.failed, JobStatus.cancelled):
        raise typer.Exit(EXIT_FAILED)
    if result.status == JobStatus.unknown:
        raise typer.Exit(EXIT_FAILED)
    if not result.status.terminal:
        raise typer.Exit(EXIT_TIMEOUT)


@app.command()
def submit(
    image: Annotated[Path, typer.Argument(help="picture file (PNG, JPEG, GIF, WebP, BMP, TIFF)")],
    question: Annotated[str, typer.Argument(help="the question, e.g. 图中有几个圆形？")],
    wait: Annotated[bool, typer.Option("--wait", help="block until the answer is there")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="cap on generated tokens")] = None,
    priority: Annotated[str, typer.Option(help="interactive or bulk")] = "interactive",
    owner: Annotated[str, typer.Option(help="owner of the job")] = "default",
) -> None:
    """Submit one picture and question; prints the job id (or the answer with --wait)."""
    from tuwen.pipeline.client import Client

    client = Client(settings_from())
    try:
        data = image.read_bytes()
    except OSError as exc:
        _fail(InvalidInput(f"cannot read {image}: {exc.strerror}", code="file_not_readable"), as_json)
    try:
        job = client.submit(data, question, max_new_tokens=max_new_tokens, priority=priority, owner=owner)
        if wait:
            job = client.wait(job.id, timeout=timeout, owner=owner)
    except TuwenError as exc:
        _fail(exc, as_json)
    if not wait:
        if as_json:
            _dump(job.to_json())
        else:
            console.print(job.id)
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
    if as_json:
        _dump(res.to_json())
    else:
        console.print(f"{res.id}  {res.status.value}")


@app.command()
def delete(job_id: str, owner: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Delete a job now: its result, and its image unless another job uses it."""
    from tuwen.pipeline.client import Client

    try:
        found = Client(settings_from()).delete(job_id, owner)
    except TuwenError as exc:
        _fail(exc, False)
    console.print(f"{job_id}  {'deleted' if found else 'unknown'}")
    if not found:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def status(
    minutes: Annotated[int, typer.Option(help="how many minutes of job counts to show")] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One screen: queue depths, live workers, jobs per minute, failures by code."""
    from tuwen.pipeline.status import collect, render

    try:
        snapshot = collect(settings_from(), minutes)
    except TuwenError as exc:
        _fail(exc, as_json)
    if as_json:
        _dump(snapshot)
    else:
        console.print(render(snapshot))


@app.command()
def flower(
    port: Annotated[int, typer.Option()] = 5555,
    basic_auth: Annotated[Optional[str], typer.Option(envvar="FLOWER_BASIC_AUTH", help="user:password")] = None,
) -> None:
    """Start Flower against the configured broker (basic auth strongly advised)."""
    import subprocess

    settings = settings_from()
    cmd = [sys.executable, "-m", "celery", f"--broker={settings.broker}", "flower", f"--port={port}"]
    if basic_auth:
        cmd.append(f"--basic-auth={basic_auth}")
    else:
        err.print("[yellow]warning[/yellow]: Flower without --basic-auth shows every job to anyone who can reach it")
    raise typer.Exit(subprocess.call(cmd))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
