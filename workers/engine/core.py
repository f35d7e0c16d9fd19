"""Continuous batching in a worker: one decode loop that groups of jobs join between steps.

Groups arrive from any thread (each Celery batch call prepares its jobs' pictures and prompts on its
own thread, overlapping the running decode), wait in two lanes (interactive before bulk, each first
come first served), and join the running batch between decode steps while there are free rows. A row
that finishes leaves at once and its answer is handed to the group's ``on_answer`` right away; the group
is done when its last row is.

Interactive groups may take ``interactive_extra`` rows beyond ``max_rows``: rows that joined together
tend to finish together (a backlog's answers have similar lengths), so a full batch can go a whole
answer's length without a free row, and an interactive job would wait for it.

Out of memory: a group that fails to join is split in halves that queue again (one row alone fails with
``out_of_memory``); a decode step that fails hands every row back to the front of its lane to start over
(rows already streamed skip the text they already sent, since greedy and seeded rows regenerate it).

Any other error is blamed on no row until one fails alone: the rows it touched (the joining rows, or
every running row for a decode step) are split in halves that queue again at the front as *suspects*. A
suspect group joins only an empty batch, and nothing joins while it runs, so each half runs apart from
everyone else; a half that fails again is split again, and a row that fails alone fails with
``unprocessable_input`` (the job's own fault: a 4xx, not retried). One bad job costs its neighbours a
restart, never their answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tuwen.pipeline.errors import InvalidInput, ModelError, OutOfMemory
from tuwen.workers.engine.batch import Parked
from tuwen.workers.engine.model import Answer, Group, Runtime
from tuwen.workers.engine.policy import Head, Limits, View, free_rows, plan

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One group inside the scheduler; ``done`` is set when all its rows have answers."""

    group: Group
    interactive: bool
    on_answer: Callable[[int, Answer], None] | None
    done: threading.Event = field(default_factory=threading.Event)
    pending: set[int] = field(default_factory=set)
    queued_at: float = field(default_factory=time.perf_counter)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


class Scheduler:
    """Owns the runtime's engine; ``submit`` from any thread, ``start`` runs the loop on its own thread.
    What joins, parks and comes back is ``engine.policy.plan``'s to say (``limits`` tunes it)."""

    def __init__(self, runtime: Runtime, max_rows: int, *, max_tokens: int = 0, idle_wait_s: float = 0.05,
                 interactive_extra: int | None = None, limits: Limits | None = None) -> None:
        self.runtime = runtime
        self.limits = limits or Limits(max_rows, -1 if interactive_extra is None else interactive_extra,
                                       max_tokens=max_tokens)
        self._cost: dict[int, int] = {}  #: id(row) -> tokens it may hold (its prompt plus its answer budget)
        self.idle_wait_s = idle_wait_s
        self.engine = runtime.engine()
        self._lanes: tuple[deque[tuple[Ticket, list[Any]]], deque[tuple[Ticket, list[Any]]]] = (deque(), deque())
        self._owner: dict[int, Ticket] = {}  #: id(row) -> its ticket
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: A row could not join for lack of memory: admit nothing until a running row leaves.
        self._blocked = False
        #: Rows taken from a lane and being prefilled right now (neither waiting nor running yet).
        self._joining = 0
        self._joining_interactive = 0
        #: Rows handed over from the queue and still being prepared (``expect``), all and interactive.
        self._coming = [0, 0]
        #: Bulk rows that gave way to interactive ones, oldest first (``Engine.park``).
        self._parked: deque[Parked] = deque()
        #: Rows under suspicion (``id(row)``): they run apart from all other rows until they finish.
        self._suspects: set[int] = set()
        #: Drill hook, called with the rows about to run (a join's, or the running batch before a step).
        self.before_rows: Callable[[list[Any]], None] | None = None
        #: Observers: called with (rows running, rows waiting) after every step and join (metrics, streams).
        self.on_step: list[Callable[[int, int], None]] = []

    @property
    def max_rows(self) -> int:
        return self.limits.max_rows

    @property
    def interactive_extra(self) -> int:
        return self.limits.interactive_extra

    # -- producer side (any thread) ------------------------------------------------------------------
    def submit(self, group: Group, *, interactive: bool = True,
               on_answer: Callable[[int, Answer], None] | None = None) -> Ticket:
        """Queue a prepared group. Items that already failed preparation are reported at once."""
        ticket = Ticket(group, interactive, on_answer)
        rows = list(group.rows)
        if rows and group.enc is not None:
            prompts = group.enc["attention_mask"].sum(-1).tolist()
            for row, n in zip(rows, prompts):  # each choice holds a copy of the prompt's cache
                self._cost[id(row)] = (int(n) + row.max_new_tokens) * row.sampling.n
        ticket.pending = {r.key for r in rows}
        for i, answer in enumerate(group.answers):
            if i not in ticket.pending and on_answer is not None:
                on_answer(i, answer)
        if not rows:
            ticket.done.set()
            return ticket
        with self._lock:
            for r in rows:
                self._owner[id(r)] = ticket
            self._lanes[0 if interactive else 1].append((ticket, rows))
            self._lock.notify()
        return ticket

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(_width(rows) for lane in self._lanes for _, rows in lane)

    @property
    def ahead(self) -> int:
        """Rows waiting to join or on their way (``expect``)."""
        return self.waiting + self._coming[0]

    @property
    def parked(self) -> int:
        return sum(len(p.rows) for p in self._parked)

    @property
    def free_rows(self) -> int:
        """Rows that could join now (what the consumer should hand over next): neither running, parked,
        waiting, joining, nor on their way (``expect``)."""
        return free_rows(self.limits, self.view())

    def view(self) -> View:
        """What the policy needs to know about the loop now."""
        with self._lock:
            heads = [Head(_width(lane[0][1]), self._tokens(lane[0][1]), self._suspect(lane[0][1])) if lane else None
                     for lane in self._lanes]
            waiting = [sum(_width(rows) for _, rows in lane) for lane in self._lanes]
            # Read from the hand-over's thread too, while the loop steps: a row that just left has no owner.
            running = [(lv.row, self._owner.get(id(lv.row))) for lv in self.engine.rows]
            parked = list({id(lv.row): lv.row for p in self._parked for lv in p.rows}.values())
            return View(
                running=len(running), running_bulk=sum(t is not None and not t.interactive for _, t in running),
                parked=len(parked), held_tokens=self._tokens([r for r, _ in running] + parked),
                heads=(heads[0], heads[1]), waiting=sum(waiting),
                interactive_waiting=waiting[0] + self._joining_interactive, joining=self._joining,
                coming=self._coming[0], coming_interactive=self._coming[1], blocked=self._blocked,
                isolating=self._isolating)

    def _tokens(self, rows: list[Any]) -> int:
        return sum(self._cost.get(id(r), 0) for r in rows)

    def expect(self, rows: int, interactive: bool = False) -> Callable[[], None]:
        """``rows`` were handed over and are being prepared for this loop; they count against free rows
        until the returned call says they were submitted (or never will be; calling it again does
        nothing). Without it a hand-over every few milliseconds saw the same free rows while the last one
        was still fetching pictures: 72 rows waited behind a 64-row batch at a backlog's start, nine
        groups preparing at once (measured). Interactive rows on their way already make bulk rows give way."""
        counts = (rows, rows if interactive else 0)
        with self._lock:
            self._coming = [a + b for a, b in zip(self._coming, counts)]
        done = threading.Event()

        def arrived() -> None:
            if not done.is_set():
                done.set()
                with self._lock:
                    self._coming = [a - b for a, b in zip(self._coming, counts)]
        return arrived

    # -- the loop ------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="tuwen-decode", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one batch
                log.exception("decode loop error")

    def tick(self) -> None:
        """Do what the policy says (give way, come back, or admit a waiting group), then one decode step
        (or wait for work)."""
        with self._lock:
            todo = plan(self.limits, self.view())
            joining = self._lanes[todo.join].popleft() if todo.join is not None else None
            if joining is not None:
                self._joining = _width(joining[1])
                self._joining_interactive = self._joining if joining[0].interactive else 0
        if todo.park:
            self._park(todo.park)
        elif todo.unpark:
            self._unpark(todo.unpark)
        elif joining is not None:
            try:
                self._join(*joining)
            finally:
                self._joining = self._joining_interactive = 0
            self._observe()  # a join's prefill gave its rows their first token: stream it now, not a step later
        if not self.engine.size:
            with self._lock:
                if not any(self._lanes) and not self._parked and not self._stop.is_set():
                    self._lock.wait(self.idle_wait_s)
            return
        try:
            if self.before_rows is not None:
                self.before_rows([live.row for live in self.engine.rows])
            finished = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - decided in _step_failed
            self._step_failed(exc)
            return
        self._report(finished)
        self._observe()

    def _park(self, count: int) -> None:
        """``count`` bulk rows give way: those with the most answer budget left (the rest leave soon). The
        choices of one row go together."""
        rows = self.engine.rows
        bulk = [i for i, lv in enumerate(rows) if not self._owner[id(lv.row)].interactive]
        bulk.sort(key=lambda i: len(rows[i].tokens) - rows[i].row.max_new_tokens)
        going = {id(rows[i].row) for i in bulk[:count]}
        self._parked.append(self.engine.park([i for i in bulk if id(rows[i].row) in going]))
        log.debug("%d bulk rows gave way to interactive ones", count)

    def _unpark(self, count: int) -> None:
        while count and self._parked:
            back, rest = self._parked.popleft().split(count)
            if rest is not None:
                self._parked.appendleft(rest)
            self.engine.unpark(back)
            count -= len(back.rows)

    def _observe(self) -> None:
        for observe in self.on_step:
            observe(self.engine.size, self.waiting)

    @property
    def _isolating(self) -> bool:
        return bool(self._suspects) and any(id(live.row) in self._suspects for live in self.engine.rows)

    def _suspect(self, rows: list[Any]) -> bool:
        return any(id(r) in self._suspects for r in rows)

    def _join(self, ticket: Ticket, rows: list[Any]) -> None:
        try:
            if self.runtime.before_generate is not None:
                self.runtime.before_generate(self.engine.size + len(rows))
            if self.before_rows is not None:
                self.before_rows(list(rows))
            whole = len(rows) == len(ticket.group.rows) and all(a is b for a, b in zip(rows, ticket.group.rows))
            enc = ticket.group.enc if whole else self.engine.encode(rows)
            finished = self.engine.add(rows, enc)
        except torch.OutOfMemoryError:
            self._free_memory()
            if len(rows) == 1 and not self.engine.size:
                self._fail(rows, OutOfMemory("the model ran out of memory on this single item").as_error())
                return
            if len(rows) == 1:  # wait until some running rows have left
                self._requeue(ticket, rows, front=True)
                self._blocked = True
                return
            log.warning("out of memory joining %d rows; retrying halves", len(rows))
            half = len(rows) // 2
            self._requeue(ticket, rows[half:], front=True)
            self._requeue(ticket, rows[:half], front=True)
            return
        except Exception as exc:  # noqa: BLE001 - the model failed on these rows: find which
            log.exception("joining %d rows failed", len(rows))
            if len(rows) == 1 and (not self.engine.size or self._suspect(rows)):
                self._fail(rows, _alone(exc))
                return
            for half in reversed(_halves(rows)):
                self._suspects.update(id(r) for r in half)
                self._requeue(ticket, half, front=True)
            return
        self._report(finished)

    def _step_failed(self, exc: Exception) -> None:
        sent: dict[int, dict[int, int]] = {}  #: id(row) -> characters each of its choices streamed
        for lv in self.engine.rows:
            sent.setdefault(id(lv.row), dict(lv.family.sent) if lv.family is not None else {})[lv.choice] = lv.sent
        rows = list({id(lv.row): lv.row for lv in self.engine.rows}.values())  # a row with n > 1 is there n times
        self.engine = self.runtime.engine()
        self._blocked = False
        if isinstance(exc, torch.OutOfMemoryError):
            self._free_memory()
            log.warning("out of memory in a decode step of %d rows; they start again", len(rows))
            for row in reversed(rows):
                ticket = self._owner.pop(id(row))
                again = _again(row, sent[id(row)])
                self._cost[id(again)] = self._cost.pop(id(row), 0)
                self._requeue(ticket, [again], front=True)
            return
        log.error("a decode step of %d rows failed: %s", len(rows), exc, exc_info=exc)
        if len(rows) == 1:
            self._fail(rows, _alone(exc))
            return
        # Each half of the batch starts again as one suspect group (its rows may be of several tickets).
        for half in reversed(_halves(rows)):
            tickets, again_rows = [], []
            for row in half:
                tickets.append(self._owner.pop(id(row)))
                again = _again(row, sent[id(row)])
                self._owner[id(again)] = tickets[-1]
                self._cost[id(again)] = self._cost.pop(id(row), 0)
                self._suspects.discard(id(row))
                self._suspects.add(id(again))
                again_rows.append(again)
            self._requeue(tickets[0], again_rows, front=True)

    def _requeue(self, ticket: Ticket, rows: list[Any], front: bool) -> None:
        with self._lock:
            for r in rows:
                self._owner.setdefault(id(r), ticket)  # rows of a suspect group keep their own tickets
            lane = self._lanes[0 if ticket.interactive else 1]
            lane.appendleft((ticket, rows)) if front else lane.append((ticket, rows))

    def _free_memory(self) -> None:
        """Out of memory: the kept pictures' features and prefixes go first (``engine.reuse``), then the
        allocator's cached blocks."""
        reuse = getattr(self.engine, "reuse", None)
        if reuse is not None:
            reuse.clear()
        if self.runtime.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _report(self, finished: list[Any]) -> None:
        if finished:
            self._blocked = False
        for f in finished:
            self._cost.pop(id(f.row), None)
            self._suspects.discard(id(f.row))
            ticket = self._owner.pop(id(f.row))
            self._deliver(ticket, f.row.key, self.runtime.finish(ticket.group, f))

    def _fail(self, rows: list[Any], error: dict[str, Any]) -> None:
        for row in rows:
            self._cost.pop(id(row), None)
            self._suspects.discard(id(row))
            ticket = self._owner.pop(id(row))
            answer = ticket.group.answers[row.key]
            answer.error = error
            self._deliver(ticket, row.key, answer)

    def _deliver(self, ticket: Ticket, index: int, answer: Answer) -> None:
        answer.timings["queue_in_worker_ms"] = round((time.perf_counter() - ticket.queued_at) * 1000, 2)
        if ticket.on_answer is not None:
            try:
                ticket.on_answer(index, answer)
            except Exception:  # noqa: BLE001 - a failing observer must not stop the loop
                log.exception("on_answer failed")
        ticket.pending.discard(index)
        if not ticket.pending:
            ticket.done.set()


def _width(rows: list[Any]) -> int:
    """Rows of the batch that ``rows`` take: a row with ``n`` choices takes ``n``."""
    return sum(r.sampling.n for r in rows)


def _halves(items: list[Any]) -> list[list[Any]]:
    half = (len(items) + 1) // 2
    return [part for part in (items[:half], items[half:]) if part]


def _alone(exc: Exception) -> dict[str, Any]:
    """The error of a row that failed with no other row beside it: the job's own (4xx, not retryable)."""
    return InvalidInput(f"the model failed on this job alone: {type(exc).__name__}: {exc}",
                        code="unprocessable_input").as_error()


class _SkipSent:
    """A streaming callback for a row that starts again: the first ``already[choice]`` characters of each
    choice were sent (with their log probabilities)."""

    def __init__(self, target: Callable[..., None], already: dict[int, int]) -> None:
        self.target, self.already, self.seen = target, already, dict.fromkeys(already, 0)

    def __call__(self, piece: str, **extra: Any) -> None:
        choice = extra.get("choice", 0)
        start = self.seen.get(choice, 0)
        self.seen[choice] = start + len(piece)
        skip = max(0, self.already.get(choice, 0) - start)
        if skip < len(piece) or (not piece and start >= self.already.get(choice, 0)):
            self.target(piece[skip:], **extra)


def _again(row: Any, sent: dict[int, int]) -> Any:
    """The same row, to start over after its decode step failed (``sent``: characters each choice streamed)."""
    from dataclasses import replace

    if row.on_text is None:
        return row
    previous = row.on_text
    if isinstance(previous, _SkipSent):
        merged = {c: max(previous.already.get(c, 0), sent.get(c, 0)) for c in {*previous.already, *sent}}
        return replace(row, on_text=_SkipSent(previous.target, merged))
    return replace(row, on_text=_SkipSent(previous, sent))
