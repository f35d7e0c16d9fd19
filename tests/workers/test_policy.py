"""The batching policy as a table: what the loop and the hand-over see, and what ``plan`` says to do."""

from __future__ import annotations

from typing import Any

import pytest

from tuwen.workers.engine.policy import BULK, INTERACTIVE, Head, Limits, View, affinity_order, plan

W64 = Limits(64, beside_interactive=8)  # the worker's defaults: 64 rows, 8 bulk rows beside interactive ones
T = Limits(64, max_tokens=1000)
NEVER = Limits(64)  # bulk rows never give way (the class default)
I8, B8 = Head(8), Head(8)

# (case, limits, view, what the plan must say: a subset of Plan's fields)
CASES: list[tuple[str, Limits, View, dict[str, Any]]] = [
    # -- the hand-over: how many buffered jobs go over ----------------------------------------------
    ("idle: a group that is not full waits the batch window", W64, View(buffered=3), dict(hand_over=0)),
    ("idle: once the oldest waited the window, it goes", W64, View(buffered=3, waited_s=0.05), dict(hand_over=3)),
    ("idle: a full group goes at once", W64, View(buffered=8), dict(hand_over=8)),
    ("idle: at most two groups ahead", W64, View(buffered=100), dict(hand_over=16)),
    ("busy: whole hand-overs (12 free rows go as one group of 8)", W64,
     View(running=52, running_bulk=52, buffered=20), dict(hand_over=8)),
    ("busy: less than a quarter-batch waits for more rows to free up", W64,
     View(running=61, running_bulk=61, waiting=8, buffered=20), dict(hand_over=0)),
    ("busy: a quarter-batch joins", W64, View(running=56, running_bulk=56, buffered=20), dict(hand_over=8)),
    ("busy: a small group goes once it waited the window", W64,
     View(running=40, running_bulk=40, waiting=8, buffered=3, waited_s=0.06), dict(hand_over=3)),
    ("the tail: the backlog's last jobs go at once when nothing else is ahead", W64,
     View(running=40, running_bulk=40, buffered=3), dict(hand_over=3)),
    ("a full batch: one group is prepared ahead", W64, View(running=64, running_bulk=64, buffered=30),
     dict(hand_over=8)),
    ("a full batch with a group ahead: nothing more", W64,
     View(running=64, running_bulk=64, waiting=8, buffered=30), dict(hand_over=0)),
    ("rows on their way count as ahead", W64, View(running=20, running_bulk=20, coming=16, buffered=30),
     dict(hand_over=0)),
    ("parked rows are not free rows: one group is prepared ahead, as for a full batch", W64,
     View(running=9, running_bulk=8, parked=56, buffered=30), dict(hand_over=8)),
    ("... and no more", W64, View(running=9, running_bulk=8, parked=56, waiting=8, buffered=30), dict(hand_over=0)),
    ("interactive jobs go over at once while the model is busy", W64,
     View(running=64, running_bulk=64, waiting=8, buffered=30, buffered_interactive=3), dict(hand_over=3)),
    ("interactive jobs in the buffer of an idle model go as a group does", W64,
     View(buffered=2, buffered_interactive=2, waited_s=0.0), dict(hand_over=0)),
    ("bulk groups are 8 jobs", W64, View(), dict(group=8)),
    ("bulk groups are 4 while interactive jobs were seen lately", W64, View(interactive_recent=True), dict(group=4)),
    # -- the loop: who joins ------------------------------------------------------------------------
    ("an empty batch takes the interactive group first", W64, View(heads=(I8, B8), waiting=16),
     dict(join=INTERACTIVE)),
    ("a bulk group joins a running bulk batch with room", W64,
     View(running=40, running_bulk=40, heads=(None, B8), waiting=8), dict(join=BULK)),
    ("first come first served: a bulk head that does not fit holds its lane", W64,
     View(running=60, running_bulk=60, heads=(None, B8), waiting=8), dict(join=None)),
    ("an interactive group may take rows beyond max_rows", NEVER,
     View(running=64, running_bulk=64, heads=(I8, B8), waiting=16), dict(join=INTERACTIVE, park=0)),
    ("... but no more than interactive_extra", NEVER,
     View(running=65, running_bulk=60, heads=(I8, None), waiting=8, interactive_waiting=8), dict(join=None)),
    ("an interactive head that does not fit holds the bulk lane too", NEVER,
     View(running=70, running_bulk=60, heads=(I8, Head(1)), waiting=9, interactive_waiting=8), dict(join=None)),
    ("the token budget: a group that would pass it waits", T,
     View(running=4, running_bulk=4, held_tokens=900, heads=(None, Head(2, 200)), waiting=2), dict(join=None)),
    ("the token budget: within it, it joins", T,
     View(running=4, running_bulk=4, held_tokens=700, heads=(None, Head(2, 200)), waiting=2), dict(join=BULK)),
    ("the token budget: an empty batch takes any group", T, View(heads=(None, Head(8, 5000)), waiting=8),
     dict(join=BULK)),
    ("the token budget counts parked rows", T,
     View(running=1, running_bulk=0, parked=6, held_tokens=900, heads=(Head(1, 200), None), waiting=1,
          interactive_waiting=1), dict(join=None)),
    ("a suspect group waits for an empty batch", W64,
     View(running=3, running_bulk=3, heads=(None, Head(2, suspect=True)), waiting=2), dict(join=None)),
    ("a suspect group joins an empty batch", W64, View(heads=(None, Head(2, suspect=True)), waiting=2),
     dict(join=BULK)),
    ("nothing joins while suspects run apart", W64,
     View(running=1, running_bulk=1, isolating=True, heads=(I8, None), waiting=8), dict(join=None, park=0)),
    ("nothing joins after a join ran out of memory, until a row leaves", W64,
     View(running=30, running_bulk=30, blocked=True, heads=(None, B8), waiting=8), dict(join=None)),
    # -- bulk rows give way to interactive ones ---------------------------------------------------------
    ("an interactive group arrives at a full bulk batch: 56 bulk rows are parked", W64,
     View(running=64, running_bulk=64, heads=(Head(1), B8), waiting=9, interactive_waiting=1),
     dict(park=56, join=None)),
    ("interactive rows on their way already park bulk rows", W64,
     View(running=64, running_bulk=64, coming=1, coming_interactive=1), dict(park=56)),
    ("then the interactive group joins the small batch", W64,
     View(running=8, running_bulk=8, parked=56, heads=(Head(1), None), waiting=1, interactive_waiting=1),
     dict(park=0, unpark=0, join=INTERACTIVE)),
    ("while interactive rows run no bulk group is prefilled", W64,
     View(running=5, running_bulk=4, parked=0, heads=(None, B8), waiting=8), dict(join=None)),
    ("while interactive rows run parked rows come back up to the cap", W64,
     View(running=5, running_bulk=4, parked=56), dict(unpark=4)),
    ("once interactive rows are gone, parked rows come back first", W64,
     View(running=8, running_bulk=8, parked=56, heads=(None, B8), waiting=8), dict(unpark=56, join=None)),
    ("parked rows come back into the room there is", W64,
     View(running=60, running_bulk=60, parked=10), dict(unpark=4)),
    ("a waiting interactive group goes before parked rows", W64,
     View(running=70, running_bulk=62, parked=10, heads=(Head(1), None), waiting=1, interactive_waiting=1),
     dict(unpark=0)),
    ("bulk groups wait while rows are parked", W64,
     View(running=64, running_bulk=64, parked=4, heads=(None, Head(2)), waiting=2), dict(join=None, unpark=0)),
    ("with the cap at max_rows, bulk rows never give way", NEVER,
     View(running=64, running_bulk=64, heads=(Head(1), None), waiting=1, interactive_waiting=1),
     dict(park=0, join=INTERACTIVE)),
    ("a cap of 0 parks every bulk row", Limits(64, beside_interactive=0),
     View(running=64, running_bulk=64, heads=(Head(1), None), waiting=1, interactive_waiting=1), dict(park=64)),
]


@pytest.mark.parametrize(("limits", "view", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(limits: Limits, view: View, expected: dict[str, Any]) -> None:
    decided = plan(limits, view)
    assert {k: getattr(decided, k) for k in expected} == expected


def test_the_policy_is_pure() -> None:
    """No torch, no threads, no clock: the same view gives the same plan, and the module imports nothing heavy."""
    import ast
    import inspect

    from tuwen.workers.engine import policy

    imported = {n.module or "" for n in ast.walk(ast.parse(inspect.getsource(policy))) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(inspect.getsource(policy))) if isinstance(n, ast.Import)
                 for a in n.names}
    assert imported <= {"__future__", "collections.abc", "dataclasses"}
    view = View(running=64, running_bulk=64, heads=(Head(1), B8), waiting=9, interactive_waiting=1, buffered=5)
    assert plan(W64, view) == plan(W64, view)


@pytest.mark.parametrize("pictures, warm, order", [
    ([], set(), []),
    (["c", "a", "b"], set(), [0, 1, 2]),  # nothing to prefer: oldest first
    (["a", "b", "a", "c", "b"], {"c"}, [0, 2, 3, 1, 4]),  # the oldest's page-mates, then warm pictures
    (["x", "c", "c"], {"c"}, [0, 1, 2]),  # the oldest goes first even when cold
    (["a", "", "b"], {"b"}, [0, 2, 1]),  # a job without pictures waits behind warm ones, never for ever
])
def test_affinity_prefers_the_oldest_then_its_pictures_then_warm_ones(pictures: list[str], warm: set[str],
                                                                       order: list[int]) -> None:
    assert affinity_order([frozenset([p]) if p else frozenset() for p in pictures], warm) == order


def test_affinity_starves_no_job() -> None:
    """A cold job behind a stream of warm ones goes over within as many hand-overs as jobs were before it."""
    queue = [frozenset(["w"])] * 3 + [frozenset(["cold"])]
    for rounds in range(1, 10):
        first = affinity_order(queue, {"w"})[0]
        if queue[first] == frozenset(["cold"]):
            break
        queue = [q for i, q in enumerate(queue) if i != first] + [frozenset(["w"])]  # a warm job arrives
    assert rounds == 4
