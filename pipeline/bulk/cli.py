"""``tuwen bulk …`` and ``tuwen eval``: bulks from a file, their progress, results and report.

Progress goes to stderr, ids and data to stdout, so ``ID=$(tuwen bulk submit f.jsonl --no-wait)`` works.
Exit codes as in ``tuwen``: 0 ok · 1 the bulk failed, was cancelled or expired, or every one of its lines
failed · 2 input refused · 3 a service is unavailable (run the same command again to continue) ·
130 interrupted (likewise). User data (custom_ids, paths, error lines) is printed escaped.
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
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from tuwen.pipeline.errors import InvalidInput, TuwenError
from tuwen.pipeline.settings import Settings

if TYPE_CHECKING:
    from tuwen.pipeline.bulk.model import Bulk
    from tuwen.pipeline.bulk.store import BulkStore
    from tuwen.pipeline.bulk.submission import SubmitProgress

bulk_app = typer.Typer(help="Bulks: one file in (JSONL, CSV or a folder), one answer per line out.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# soft_wrap: a line longer than the terminal (a command to copy, a path) is never broken in two
out = Console(highlight=False, emoji=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)
EXIT_FAILED, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 1, 2, 3, 130


def _store() -> BulkStore:
    from tuwen.pipeline.bulk.store import BulkStore
    from tuwen.pipeline.client import Client

    return BulkStore(Client(Settings()))


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _fail(exc: TuwenError) -> NoReturn:
    err.print(f"[red]error[/red] {escape(exc.code)}: {escape(exc.message)}")
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


class BulkBar:
    """The live bar: uploaded / queued / done / failed, rate and ETA of finished lines."""

    def __init__(self, total: int, label: str = "bulk") -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("uploaded {task.fields[uploaded]} · queued {task.fields[queued]} · "
                       "[green]done {task.fields[done]}[/green] · [red]failed {task.fields[failed]}[/red]"),
            _Rate(), TimeRemainingColumn(), console=err, refresh_per_second=4)
        self.task = self.progress.add_task(label, total=total, uploaded=0, queued=0, done=0, failed=0)

    def __enter__(self) -> BulkBar:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def submitted(self, p: SubmitProgress) -> None:
        self.progress.update(self.task, uploaded=p.uploaded, queued=p.queued)

    def bulk(self, b: Bulk) -> None:
        c = b.request_counts
        self.progress.update(self.task, total=c.total, completed=c.completed + c.failed, done=c.completed,
                             failed=c.failed, uploaded=max(b.submitted, self.progress.tasks[0].fields["uploaded"]),
                             queued=b.queued, description=escape(f"{b.id} {b.state.value}"))


@contextmanager
def _graceful_stop() -> Iterator[threading.Event]:
    """First Ctrl-C: stop after the line being enqueued (resumable). Second, or once ``stop`` is set:
    stop at once."""
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


def _waiting_hint(bulk: Bulk) -> None:
    err.print(f"{bulk.queued} lines queued; waiting for the answers (Ctrl-C stops waiting, the bulk goes on)")


def _throttled(store: BulkStore, bar: BulkBar) -> Callable[[SubmitProgress], None]:
    """Progress callback: the upload counts at once, the finished counts at most once a second."""
    last = [0.0]

    def update(p: SubmitProgress) -> None:
        bar.submitted(p)
        if time.monotonic() - last[0] > 1.0:
            last[0] = time.monotonic()
            bar.bulk(store.refresh(p.bulk_id))

    return update


def _finish(bulk: Bulk, as_json: bool) -> None:
    c = bulk.request_counts
    if as_json:
        _dump(bulk.to_json())
    else:
        err.print(f"{bulk.state.value}: {c.completed} completed, {c.failed} failed of {c.total}")
        out.print(escape(bulk.id))
    all_failed = c.total > 0 and c.completed == 0 and c.failed == c.total
    if bulk.state.value in ("failed", "cancelled", "expired") or all_failed:
        raise typer.Exit(EXIT_FAILED)


@bulk_app.command("submit")
def submit(
    file: Annotated[Path | None, typer.Argument(
        help="JSONL or CSV (custom_id, image or pdf + pages, question, params), or a folder")] = None,
    images_dir: Annotated[Path | None, typer.Option(
        help="the folder image paths are inside; nothing outside it is read (default: FILE's folder)")] = None,
    question: Annotated[str | None, typer.Option(help="the question for a folder (and lines without one)")] = None,
    owner: Annotated[str, typer.Option(help="whose bulk it is: its jobs, results and pictures")] = "default",
    concurrency: Annotated[int, typer.Option(help="parallel uploads")] = 8,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="show progress until the bulk ends")] = True,
    new: Annotated[bool, typer.Option("--new", help="a new bulk even if this input was submitted before")] = False,
    window_hours: Annotated[float, typer.Option(help="completion window; unfinished lines then expire")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the bulk as JSON")] = False,
    schema: Annotated[Path | None, typer.Option(
        help="a JSON Schema file: every answer is a JSON object valid against it (a line's params may override)")
    ] = None,
    pdf: Annotated[Path | None, typer.Option(help="a PDF instead of FILE: --questions about each of its pages")] = None,
    questions: Annotated[Path | None, typer.Option(help="with --pdf: a text file, one question a line")] = None,
    pages: Annotated[str | None, typer.Option(help="with --pdf: the pages, e.g. 3-5,9 (default: all)")] = None,
) -> None:
    """Submit a file of questions as one bulk (on the bulk queue); the same command again resumes it.
    With --pdf and --questions, every question is asked about every page (a page's questions together)."""
    from tuwen.pipeline.bulk.manifest import WithParams, open_source, schema_params
    from tuwen.pipeline.client import Client

    store = _store()
    with _errors():
        source = _pdf_source(pdf, questions, pages, store) if pdf is not None or file is None else \
            open_source(file, images_dir=images_dir, question=question)
        if schema is not None:
            defaults = schema_params(schema)
            Client.check_params(defaults)  # a schema that cannot be enforced refuses the whole file, up front
            source = WithParams(source, defaults)
    queued: str | None = None  # the bulk id once every line is enqueued
    try:
        with BulkBar(0, "validating") as bar:
            # Ctrl-C while lines are enqueued stops after the current line (resumable). The graceful
            # handler is gone before the wait, so there a single Ctrl-C stops the command.
            with _graceful_stop() as stop, _errors():
                bulk = store.submit(source, owner=owner, window_s=window_hours * 3600, fresh=new,
                                     concurrency=concurrency, stop=stop, on_progress=_throttled(store, bar))
                if bulk.submitted >= bulk.request_counts.total:
                    queued = bulk.id
            bar.bulk(bulk)
            if stop.is_set() and not bulk.state.terminal:
                if queued is None:
                    err.print(f"stopped; {bulk.submitted} of {bulk.request_counts.total} lines submitted. "
                              "Run the same command again to continue.")
                    out.print(escape(bulk.id))
                    raise typer.Exit(EXIT_INTERRUPTED)
                raise KeyboardInterrupt  # Ctrl-C came as the last line was queued: as in the wait
            if wait:
                _waiting_hint(bulk)
                with _errors():
                    bulk = store.wait(bulk.id, on_update=bar.bulk)
    except KeyboardInterrupt:
        if queued is None:
            err.print("interrupted; run the same command again to continue the submission")
        else:
            err.print(f"interrupted; the bulk goes on. Watch it with: tuwen bulk status {escape(queued)} --watch")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _finish(bulk, as_json)


def _pdf_source(pdf: Path | None, questions: Path | None, pages: str | None, store: Any) -> Any:
    """``--pdf FILE --questions FILE [--pages 3-5,9]`` as a bulk's source (``bulk.pdfs.PdfSource``)."""
    from tuwen.pipeline.bulk.pdfs import PdfSource, read_questions
    from tuwen.pipeline.errors import InvalidInput

    if pdf is None or questions is None:
        raise InvalidInput("give FILE, or --pdf with --questions", code="missing_question")
    if not pdf.is_file():
        raise InvalidInput(f"no such file: {pdf}", code="file_not_found")
    return PdfSource(pdf, read_questions(questions, store.client.settings.max_conversation_chars), pages)


@bulk_app.command("status")
def status(
    bulk_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="show the live bar until the bulk ends")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A bulk's state, counts and times."""
    store = _store()
    with _errors():
        bulk = store.refresh(bulk_id)
        if watch and not bulk.state.terminal:
            try:
                with BulkBar(bulk.request_counts.total) as bar:
                    bulk = store.wait(bulk_id, on_update=bar.bulk)
            except KeyboardInterrupt:
                raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        _dump(bulk.to_json())
        return
    table = Table(show_header=False, box=None)
    c = bulk.request_counts
    for k, v in [("id", bulk.id), ("state", bulk.state.value), ("input", bulk.input), ("owner", bulk.owner),
                 ("total", c.total), ("submitted", bulk.submitted), ("completed", c.completed), ("failed", c.failed),
                 ("created", _when(bulk.created_at)), ("finished", _when(bulk.finished_at)),
                 ("expires", _when(bulk.expires_at)), ("results", bulk.output_key or "—")]:
        table.add_row(k, escape(str(v)))
    out.print(table, soft_wrap=False)
    for line in bulk.errors[:50]:
        out.print(f"[red]{escape(line)}[/red]")


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"


@bulk_app.command("cancel")
def cancel(bulk_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Cancel a bulk: queued lines are cancelled, running ones finish."""
    with _errors():
        bulk = _store().cancel(bulk_id)
    if as_json:
        _dump(bulk.to_json())
    else:
        out.print(f"{escape(bulk.id)}  {bulk.state.value}")


@bulk_app.command("list")
def list_bulks(limit: Annotated[int, typer.Option()] = 20,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The newest bulks."""
    with _errors():
        bulks = _store().recent(limit)
    if as_json:
        _dump([b.to_json() for b in bulks])
        return
    # Ids are never cut, however narrow the terminal: the input's name folds instead.
    ids = Column("id", no_wrap=True, min_width=max((len(b.id) for b in bulks), default=2))
    table = Table(ids, "state", "total", "completed", "failed", "created", Column("input", overflow="fold"))
    for b in bulks:
        c = b.request_counts
        table.add_row(escape(b.id), b.state.value, str(c.total), str(c.completed), str(c.failed), _when(b.created_at),
                      escape(b.input))
    out.print(table, soft_wrap=False)


@bulk_app.command("results")
def results(
    bulk_id: str,
    out_path: Annotated[Path | None, typer.Option("--out", help="results.jsonl: one line per input line")] = None,
    errors_path: Annotated[Path | None, typer.Option("--errors", help="errors.jsonl: the failed lines only")] = None,
) -> None:
    """Write one JSON line per input line, in input order (stdout without --out)."""
    from tuwen.pipeline.bulk.outputs import write_jsonl

    store = _store()
    with _errors():
        store.refresh(bulk_id)
        sink = out_path.open("w", encoding="utf-8") if out_path else sys.stdout
        errs = errors_path.open("w", encoding="utf-8") if errors_path else None
        try:
            n, failed = write_jsonl(store.results(bulk_id), sink.write, errs.write if errs else None)
        finally:
            if out_path:
                sink.close()
            if errs:
                errs.close()
    err.print(f"{n} lines, {failed} not succeeded")


@bulk_app.command("report")
def report(
    bulk_id: str,
    html_path: Annotated[Path, typer.Option("--html", help="the page to write")] = Path("report.html"),
    limit: Annotated[int, typer.Option(help="most lines on the page (failures first)")] = 2000,
) -> None:
    """A self-contained HTML page (thumbnails, question, answer, status, failure filter)."""
    from tuwen.pipeline.bulk.report import write_report

    store = _store()
    with _errors():
        bulk = store.refresh(bulk_id)
        shown = write_report(html_path, bulk, store.results(bulk_id), store.client.images, limit=limit)
    err.print(f"{shown} lines → {escape(str(html_path))}")


def eval_command(
    file: Annotated[Path, typer.Argument(help="MMBench TSV (index, question, hint, A–D, answer, category, image)")],
    circular: Annotated[bool, typer.Option("--circular", help="CircularEval: every rotation must be right")] = False,
    out_path: Annotated[Path | None, typer.Option("--out", help="write the full report as JSON")] = None,
    prompt: Annotated[str, typer.Option(help="options (MMBench's prompt) or plain (question only)")] = "options",
    new: Annotated[bool, typer.Option("--new", help="ask again even if this file was evaluated before")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the answers")] = None,
) -> None:
    """Evaluate the served model on an MMBench(-CN) TSV through the queue; prints accuracy per category."""
    from tuwen.pipeline.bulk.mmbench import PromptStyle, evaluate

    try:
        style = PromptStyle(prompt)
    except ValueError:
        _fail(InvalidInput(f"--prompt must be options or plain, not {prompt!r}", code="invalid_params"))
    store = _store()
    try:
        with _graceful_stop() as stop, BulkBar(0, "eval") as bar, _errors():

            def waiting(bulk: Bulk) -> None:
                if not stop.is_set():  # every line is queued, nothing to finish first: one Ctrl-C stops now
                    stop.set()
                    _waiting_hint(bulk)
                bar.bulk(bulk)

            result = evaluate(store, file, circular=circular, style=style, fresh=new, timeout=timeout, stop=stop,
                              on_progress=_throttled(store, bar), on_update=waiting)
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to continue")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    table = Table("category", "questions", "correct", "accuracy", title=escape(
        f"{file.name} · {'CircularEval' if circular else 'single pass'} · prompt {style.value}"))
    for cat, row in result["per_category"].items():
        table.add_row(escape(cat), str(row["questions"]), str(row["correct"]), f"{row['accuracy'] * 100:.1f}%")
    table.add_row("[bold]overall[/bold]", str(result["questions"]), str(result["correct"]),
                  f"[bold]{result['accuracy'] * 100:.1f}%[/bold]")
    out.print(table, soft_wrap=False)
    models = escape(", ".join(result["model_ids"]) or "?")
    out.print(f"bulk {escape(result['bulk_id'])} ({result['bulk_state']}), model {models}, "
              f"{result['unanswered']} answers without a recognisable option")
    if out_path:
        out_path.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        err.print(f"report → {escape(str(out_path))}")

