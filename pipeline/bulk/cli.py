"""``tuwen bulk …`` and ``tuwen eval``: batches from a file, their progress, results and report.

Progress goes to stderr, ids and data to stdout, so ``ID=$(tuwen bulk submit f.jsonl --no-wait)`` works.
Exit codes as in ``tuwen``: 0 ok · 1 the batch failed or was cancelled · 2 input refused · 3 a service is
unavailable (run the same command again to continue) · 130 interrupted (likewise).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tuwen.pipeline.errors import InvalidInput, TuwenError
from tuwen.pipeline.settings import Settings

if TYPE_CHECKING:
    from tuwen.pipeline.bulk import Batch, BatchStore, SubmitProgress

bulk_app = typer.Typer(help="Bulk batches: one file in (JSONL, CSV or a folder), one answer per line out.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
EXIT_FAILED, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 1, 2, 3, 130


def _store() -> BatchStore:
    from tuwen.pipeline.bulk import BatchStore
    from tuwen.pipeline.client import Client

    return BatchStore(Client(Settings()))


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _fail(exc: TuwenError) -> NoReturn:
    err.print(f"[red]error[/red] {exc.code}: {exc.message}", markup=True, highlight=False)
    if exc.retryable:
        err.print("run the same command again to continue where it stopped")
    raise typer.Exit(EXIT_REFUSED if isinstance(exc, InvalidInput) else EXIT_UNAVAILABLE if exc.retryable
                     else EXIT_FAILED)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except TuwenError as exc:
        _fail(exc)


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "–/s", style="cyan")


class BatchBar:
    """The live bar: uploaded / queued / done / failed, rate and ETA of finished lines."""

    def __init__(self, total: int, label: str = "batch") -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("uploaded {task.fields[uploaded]} · queued {task.fields[queued]} · "
                       "[green]done {task.fields[done]}[/green] · [red]failed {task.fields[failed]}[/red]"),
            _Rate(), TimeRemainingColumn(), console=err, refresh_per_second=4)
        self.task = self.progress.add_task(label, total=total, uploaded=0, queued=0, done=0, failed=0)

    def __enter__(self) -> BatchBar:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def submitted(self, p: SubmitProgress) -> None:
        self.progress.update(self.task, uploaded=p.uploaded, queued=p.queued)

    def batch(self, b: Batch) -> None:
        c = b.request_counts
        self.progress.update(self.task, total=c.total, completed=c.completed + c.failed, done=c.completed,
                             failed=c.failed, uploaded=max(b.submitted, self.progress.tasks[0].fields["uploaded"]),
                             queued=b.queued, description=f"{b.id} {b.state.value}")


@contextmanager
def _graceful_stop() -> Iterator[threading.Event]:
    """First Ctrl-C: stop after the line being enqueued (resumable). Second: stop at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err.print("stopping after the current line; run the same command again to continue")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _throttled(store: BatchStore, bar: BatchBar) -> Callable[[SubmitProgress], None]:
    """Progress callback: the upload counts at once, the finished counts at most once a second."""
    last = [0.0]

    def update(p: SubmitProgress) -> None:
        bar.submitted(p)
        if time.monotonic() - last[0] > 1.0:
            last[0] = time.monotonic()
            bar.batch(store.refresh(p.batch_id))

    return update


def _finish(batch: Batch, as_json: bool) -> None:
    if as_json:
        _dump(batch.to_json())
    else:
        c = batch.request_counts
        err.print(f"{batch.state.value}: {c.completed} completed, {c.failed} failed of {c.total}")
        out.print(batch.id)
    if batch.state.value in ("failed", "cancelled", "expired"):
        raise typer.Exit(EXIT_FAILED)


@bulk_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="JSONL or CSV (custom_id, image, question, params), or a folder")],
    images_dir: Annotated[Path | None, typer.Option(help="where relative image paths are (default: FILE's folder)")] = None,
    question: Annotated[str | None, typer.Option(help="the question for a folder (and lines without one)")] = None,
    owner: Annotated[str, typer.Option()] = "default",
    concurrency: Annotated[int, typer.Option(help="parallel uploads")] = 8,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="show progress until the batch ends")] = True,
    new: Annotated[bool, typer.Option("--new", help="a new batch even if this input was submitted before")] = False,
    window_hours: Annotated[float, typer.Option(help="completion window; unfinished lines then expire")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the batch as JSON")] = False,
) -> None:
    """Submit a file of questions as a batch on the bulk queue; the same command again resumes it."""
    from tuwen.pipeline.manifest import open_source

    store = _store()
    with _errors():
        source = open_source(file, images_dir=images_dir, question=question)
    try:
        with _graceful_stop() as stop, BatchBar(0, "validating") as bar:
            with _errors():
                batch = store.submit(source, owner=owner, window_s=window_hours * 3600, fresh=new,
                                     concurrency=concurrency, stop=stop, on_progress=_throttled(store, bar))
            bar.batch(batch)
            if stop.is_set() and not batch.state.terminal:
                err.print(f"stopped; {batch.submitted} of {batch.request_counts.total} lines submitted. "
                          "Run the same command again to continue.")
                out.print(batch.id)
                raise typer.Exit(EXIT_INTERRUPTED)
            if wait:
                with _errors():
                    batch = store.wait(batch.id, on_update=bar.batch)
    except KeyboardInterrupt:
        err.print("interrupted; the batch goes on. Watch it with: tuwen bulk status ID --watch")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _finish(batch, as_json)


@bulk_app.command("status")
def status(
    batch_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="show the live bar until the batch ends")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A batch's state, counts and times."""
    store = _store()
    with _errors():
        batch = store.refresh(batch_id)
        if watch and not batch.state.terminal:
            try:
                with BatchBar(batch.request_counts.total) as bar:
                    batch = store.wait(batch_id, on_update=bar.batch)
            except KeyboardInterrupt:
                raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        _dump(batch.to_json())
        return
    table = Table(show_header=False, box=None)
    c = batch.request_counts
    for k, v in [("id", batch.id), ("state", batch.state.value), ("input", batch.input), ("owner", batch.owner),
                 ("total", c.total), ("submitted", batch.submitted), ("completed", c.completed), ("failed", c.failed),
                 ("created", _when(batch.created_at)), ("finished", _when(batch.finished_at)),
                 ("expires", _when(batch.expires_at)), ("results", batch.output_key or "—")]:
        table.add_row(k, str(v))
    out.print(table)
    for line in batch.errors[:50]:
        out.print(f"[red]{line}[/red]", highlight=False)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"


@bulk_app.command("cancel")
def cancel(batch_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Cancel a batch: queued lines are cancelled, running ones finish."""
    with _errors():
        batch = _store().cancel(batch_id)
    if as_json:
        _dump(batch.to_json())
    else:
        out.print(f"{batch.id}  {batch.state.value}")


@bulk_app.command("list")
def list_batches(limit: Annotated[int, typer.Option()] = 20, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The newest batches."""
    with _errors():
        batches = _store().recent(limit)
    if as_json:
        _dump([b.to_json() for b in batches])
        return
    table = Table("id", "state", "total", "completed", "failed", "created", "input")
    for b in batches:
        c = b.request_counts
        table.add_row(b.id, b.state.value, str(c.total), str(c.completed), str(c.failed), _when(b.created_at), b.input)
    out.print(table)


@bulk_app.command("results")
def results(
    batch_id: str,
    out_path: Annotated[Path | None, typer.Option("--out", help="results.jsonl: one line per input line")] = None,
    errors_path: Annotated[Path | None, typer.Option("--errors", help="errors.jsonl: the failed lines only")] = None,
) -> None:
    """Write one JSON line per input line, in input order (stdout without --out)."""
    store = _store()
    with _errors():
        store.refresh(batch_id)
        sink = out_path.open("w", encoding="utf-8") if out_path else sys.stdout
        errs = errors_path.open("w", encoding="utf-8") if errors_path else None
        n = failed = 0
        try:
            for line in store.results(batch_id):
                text = json.dumps(line, ensure_ascii=False) + "\n"
                sink.write(text)
                n += 1
                if line["status"] != "succeeded":
                    failed += 1
                    if errs:
                        errs.write(text)
        finally:
            if out_path:
                sink.close()
            if errs:
                errs.close()
    err.print(f"{n} lines, {failed} not succeeded")


@bulk_app.command("report")
def report(
    batch_id: str,
    html_path: Annotated[Path, typer.Option("--html", help="the page to write")] = Path("report.html"),
    limit: Annotated[int, typer.Option(help="most lines on the page (failures first)")] = 2000,
) -> None:
    """A self-contained HTML page (thumbnails, question, answer, status, failure filter)."""
    from tuwen.pipeline.report import write_report

    store = _store()
    with _errors():
        batch = store.refresh(batch_id)
        shown = write_report(html_path, batch, store.results(batch_id), store.client.images, limit=limit)
    err.print(f"{shown} lines → {html_path}")


def eval_command(
    file: Annotated[Path, typer.Argument(help="MMBench TSV (index, question, hint, A–D, answer, category, image)")],
    circular: Annotated[bool, typer.Option("--circular", help="CircularEval: every rotation must be right")] = False,
    out_path: Annotated[Path | None, typer.Option("--out", help="write the full report as JSON")] = None,
    prompt: Annotated[str, typer.Option(help="options (MMBench's prompt) or plain (question only)")] = "options",
    new: Annotated[bool, typer.Option("--new", help="ask again even if this file was evaluated before")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the answers")] = None,
) -> None:
    """Evaluate the served model on an MMBench(-CN) TSV through the queue; prints accuracy per category."""
    from tuwen.pipeline.mmbench import PromptStyle, evaluate

    try:
        style = PromptStyle(prompt)
    except ValueError:
        _fail(InvalidInput(f"--prompt must be options or plain, not {prompt!r}", code="invalid_params"))
    store = _store()
    try:
        with _graceful_stop() as stop, BatchBar(0, "eval") as bar, _errors():
            result = evaluate(store, file, circular=circular, style=style, fresh=new, timeout=timeout, stop=stop,
                              on_progress=_throttled(store, bar), on_update=bar.batch)
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to continue")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    table = Table("category", "questions", "correct", "accuracy", title=f"{file.name} · "
                  f"{'CircularEval' if circular else 'single pass'} · prompt {style.value}")
    for cat, row in result["per_category"].items():
        table.add_row(cat, str(row["questions"]), str(row["correct"]), f"{row['accuracy'] * 100:.1f}%")
    table.add_row("[bold]overall[/bold]", str(result["questions"]), str(result["correct"]),
                  f"[bold]{result['accuracy'] * 100:.1f}%[/bold]")
    out.print(table)
    out.print(f"batch {result['batch_id']} ({result['batch_state']}), model {', '.join(result['model_ids']) or '?'}, "
              f"{result['unanswered']} answers without a recognisable option")
    if out_path:
        out_path.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        err.print(f"report → {out_path}")


if __name__ == "__main__":  # `python -m tuwen.pipeline.bulk_cli …` until the lead mounts it under `tuwen`
    root = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    root.add_typer(bulk_app, name="bulk")
    root.command("eval")(eval_command)
    root()
