"""The batching policy: one pure function, ``plan``, decides everything about who runs.

In the spirit of vLLM's ``Scheduler.schedule()`` → ``SchedulerOutput``: the caller describes what it
sees (a ``View``: rows running, parked and waiting by lane, rows on their way, the hand-over buffer, the
clock) and ``plan`` answers with a ``Plan``: which bulk rows give up their place, which come back, which
waiting group joins, and how many buffered jobs the hand-over passes on. No torch, no threads, no I/O;
tests/workers/test_policy.py holds it as a table of cases. Three callers, one policy:

* the decode loop (``engine.core.Scheduler.tick``) parks, unparks and admits;
* the worker's hand-over (``serve.tasks.Handover``) passes buffered Celery messages on;
* the bench feeder (``bench.workload.mixed_continuous``) feeds the loop as the hand-over does.

The rules:

* **Interactive first.** The interactive lane is looked at before the bulk lane; within a lane first
  come, first served (a head that cannot join holds its lane, and an interactive head the bulk lane too).
  An interactive group may take ``interactive_extra`` rows beyond ``max_rows``: rows that joined together
  finish together, so a full batch can go a whole answer without a free row.
* **Bulk rows give way.** While interactive rows run or wait, at most ``beside_interactive`` bulk rows
  decode beside them: the rest are *parked* (taken out of the batch with their key/value cache, to come
  back where they left off: nothing is recomputed), and no bulk group is prefilled. A decode step over 64
  rows costs several times one over 8, and a bulk join's prefill holds up every running row, so an
  interactive job beside a full bulk batch took 3.8× its idle latency (measured, issue 23). Parked rows
  come back before any new bulk group joins, since their prefill is already paid.
* **Suspects run apart** (``engine.core``): a suspect group joins only an empty batch, and nothing joins
  or comes back while suspects run. Nothing joins while a join ran out of memory (``blocked``).
* **Budgets.** A group joins only within ``max_rows`` and, when set, the token budget ``max_tokens``
  (every row's prompt plus its answer budget, parked rows included: they hold their cache).
* **Hand-over size.** The loop should never starve nor hold much more than it can run:
  - idle: a group that fills (``group`` jobs), or whatever waited the batch window;
  - busy: as many as there are free rows, in whole groups, but at least a quarter-batch per join
    (``join_rows``: each join prefills and copies the cache once, whatever its size), unless the oldest
    job waited the window or it is the backlog's tail;
  - a full batch: one group prepared ahead, to join as rows leave;
  - never more than ``ahead_groups`` groups waiting or on their way;
  - interactive jobs go over at once while the model is busy (they wait in the loop's interactive
    lane, ahead of every bulk row, instead of behind bulk jobs in the buffer);
  - bulk groups are ``mixed_handover_rows`` while interactive jobs were seen in the last ``mixed_s``:
    the join an interactive job may find in progress is half as long.
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Sequence
from dataclasses import dataclass

INTERACTIVE, BULK = 0, 1
#: Most jobs in one hand-over, and so in one join of the decode loop: a join's prefill holds up every
#: running row, and an interactive job waiting for a row, so a wide batch fills in several joins.
HANDOVER_ROWS = 8


@dataclass(frozen=True)
class Limits:
    """What the policy is tuned by (the worker's settings)."""

    max_rows: int
    #: Rows interactive groups may take beyond ``max_rows`` (an eighth of it, at least 1).
    interactive_extra: int = -1
    #: Most bulk rows decoding while interactive rows run or wait (the rest are parked); ``max_rows`` or
    #: more: bulk rows never give way (``TUWEN_BULK_ROWS_BESIDE_INTERACTIVE``).
    beside_interactive: int = 1 << 30
    #: Token budget of the batch, parked rows included (0: none; ``TUWEN_MAX_BATCH_TOKENS``).
    max_tokens: int = 0
    #: Most jobs in one hand-over (and so in one join).
    handover_rows: int = HANDOVER_ROWS
    #: Bulk hand-overs while interactive jobs are about.
    mixed_handover_rows: int = 4
    #: Seconds an interactive job counts as "about" after it arrived.
    mixed_s: float = 30.0
    #: Most bulk hand-overs waiting in the loop or on their way (each prepares on its own thread, under
    #: the GIL the decode loop needs: seven at once made the first join take 151 ms instead of 57).
    ahead_groups: int = 2
    #: Longest a job waits in the buffer for others while the model is idle (``TUWEN_BATCH_WAIT_MS``).
    batch_wait_s: float = 0.05

    def __post_init__(self) -> None:
        if self.interactive_extra < 0:
            object.__setattr__(self, "interactive_extra", max(1, self.max_rows // 8))


@dataclass(frozen=True)
class Head:
    """The first group waiting in a lane."""

    rows: int
    tokens: int = 0  #: its rows' prompts plus answer budgets
    suspect: bool = False


@dataclass(frozen=True)
class View:
    """What the caller sees now. The loop fills the batch's side, the hand-over its buffer's too."""

    running: int = 0  #: rows in the running batch
    running_bulk: int = 0  #: of which bulk
    parked: int = 0  #: bulk rows out of the batch with their cache, to come back
    held_tokens: int = 0  #: token budget held by running and parked rows
    heads: tuple[Head | None, Head | None] = (None, None)  #: per lane (interactive, bulk)
    waiting: int = 0  #: rows waiting in both lanes
    interactive_waiting: int = 0  #: rows waiting in the interactive lane, or joining from it
    joining: int = 0  #: rows being prefilled right now
    coming: int = 0  #: rows handed over and still being prepared
    coming_interactive: int = 0  #: of which interactive
    blocked: bool = False  #: a join ran out of memory: nothing joins until a row leaves
    isolating: bool = False  #: suspect rows are running apart
    interactive_recent: bool = False  #: an interactive job arrived within ``mixed_s``
    buffered: int = 0  #: jobs in the hand-over buffer
    buffered_interactive: int = 0  #: of which interactive
    waited_s: float = 0.0  #: how long the oldest buffered job has waited

    @property
    def interactive_about(self) -> bool:
        """Interactive rows run, wait or are on their way: bulk rows give way."""
        return self.running > self.running_bulk or self.interactive_waiting > 0 or self.coming_interactive > 0


@dataclass(frozen=True)
class Plan:
    park: int = 0  #: bulk rows to take out of the batch now
    unpark: int = 0  #: parked rows to bring back now
    join: int | None = None  #: the lane whose head group joins now
    hand_over: int = 0  #: buffered jobs to pass on now, interactive ones first
    group: int = 8  #: jobs per bulk hand-over


def plan(limits: Limits, view: View) -> Plan:
    """Who gives way, who comes back, who joins, and how much is handed over: see the module docstring."""
    park, unpark, join = 0, 0, None
    if not view.blocked and not view.isolating:
        park = _park(limits, view)
        unpark = 0 if park else _unpark(limits, view)
        join = None if park or unpark else _join(limits, view)
    group = group_rows(limits, view.interactive_recent)
    return Plan(park, unpark, join, _hand_over(limits, view, group), group)


def _park(limits: Limits, view: View) -> int:
    if not view.interactive_about:
        return 0
    return max(0, view.running_bulk - limits.beside_interactive)


def _unpark(limits: Limits, view: View) -> int:
    if not view.parked or view.heads[INTERACTIVE] is not None:
        return 0  # a waiting interactive group goes first
    room = limits.max_rows - view.running
    if view.interactive_about:
        room = min(room, limits.beside_interactive - view.running_bulk)
    return max(0, min(view.parked, room))


def _join(limits: Limits, view: View) -> int | None:
    for lane, head in enumerate(view.heads):
        if head is None:
            continue
        if head.suspect:
            return lane if not view.running else None  # a suspect group waits for an empty batch
        if lane == BULK and (view.parked or view.interactive_about):
            return None  # parked rows come back first; no bulk prefill while interactive rows run
        return lane if fits(limits, view, head, lane) else None  # first come first served in a lane
    return None


def fits(limits: Limits, view: View, head: Head, lane: int) -> bool:
    """The group fits the batch now. An empty batch takes any group (none is larger than ``max_rows``), even
    while parked rows hold part of the token budget: they come back only after a waiting interactive group."""
    if not view.running:
        return True
    extra = limits.interactive_extra if lane == INTERACTIVE else 0
    if view.running + head.rows > limits.max_rows + extra:
        return False
    return not limits.max_tokens or view.held_tokens + head.tokens <= limits.max_tokens


def group_rows(limits: Limits, interactive_recent: bool) -> int:
    """Jobs in a bulk hand-over: fewer while interactive jobs are about (first token p50 0.55 -> 0.38 static
    batches during a backlog, for a slower drain than with 8: 0.75 against 0.88 of row c, measured)."""
    return min(limits.handover_rows, limits.mixed_handover_rows) if interactive_recent else limits.handover_rows


def join_rows(limits: Limits, group: int) -> int:
    """Fewest rows a hand-over brings to a running batch, unless its oldest job waited the batch window.
    Handing over each row as it freed up made joins of three rows on average, and a 64-row backlog spent
    78% of its decode thread in joins (measured). TGI waits for waiting requests in proportion to the batch
    likewise (``waiting_served_ratio``)."""
    return max(1, min(group, limits.max_rows // 4))


def free_rows(limits: Limits, view: View) -> int:
    """Rows that could join now: neither running, parked, waiting, joining nor on their way."""
    return max(0, limits.max_rows - view.running - view.parked - view.waiting - view.joining - view.coming)


def _hand_over(limits: Limits, view: View, group: int) -> int:
    busy = view.running or view.waiting
    interactive = min(view.buffered_interactive, limits.handover_rows) if busy else 0
    return max(_bulk_hand_over(limits, view, group), interactive)


def _bulk_hand_over(limits: Limits, view: View, group: int) -> int:
    buffered, ahead = view.buffered, view.waiting + view.coming
    window = view.waited_s >= limits.batch_wait_s
    room = max(0, limits.ahead_groups * group - ahead)
    if not view.running and not view.parked and not ahead:
        return min(room, buffered if buffered >= group or window else 0)
    free, join = free_rows(limits, view), join_rows(limits, group)
    if not ahead and free < join and buffered >= group:
        return group  # one group prepared ahead of a full batch; it joins as rows leave
    n = min(buffered, free, room)
    if n > group:
        n -= n % group  # whole hand-overs: 12 would go as 8 and a join of 4
    # A smaller group goes once it waited the batch window, or at once if it is all there is and the loop
    # has nothing else to join next (a backlog's last jobs waited 50 ms for nobody).
    return n if n >= join or (n and (window or (not ahead and buffered < join))) else 0


def shared_prefill(prefixes: Sequence[Hashable | None],
                   cached: Container[Hashable]) -> tuple[list[int], list[list[int]]]:
    """Which rows of a join share a prefill of their prefix (``engine.reuse``): rows with one prefix key, two
    or more of them, or one whose prefix is cached, go as a group (the prefix once, then each row's question);
    the other rows are prefilled whole, together. Returns (those rows, the groups), rows as indexes."""
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(prefixes):
        if key is not None:
            by_key.setdefault(key, []).append(i)
    groups = [rows for key, rows in by_key.items() if len(rows) > 1 or key in cached]
    grouped = {i for rows in groups for i in rows}
    return [i for i in range(len(prefixes)) if i not in grouped], groups


def affinity_order(pictures: Sequence[frozenset[Hashable]], warm: Container[Hashable]) -> list[int]:
    """The order buffered jobs (oldest first, ``pictures``: each job's) go over in (``serve.tasks.Handover``):
    the oldest first, whatever it is, then the jobs on one of its pictures (they share one prefill of it in
    the join), then jobs whose pictures this worker ran lately (``warm``: their features and prefixes are
    likely cached), then the rest, each kind oldest first. The oldest always goes, so every job becomes the
    oldest in time: none starves."""
    if not pictures:
        return []
    head = pictures[0]
    return sorted(range(len(pictures)), key=lambda i: (i > 0, not pictures[i] & head,
                                                       not any(p in warm for p in pictures[i]), i))
