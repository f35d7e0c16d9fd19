"""The decode loop: groups join a running batch between steps, interactive first, and every row's answer
is the same as alone; out-of-memory on joining or mid-decode loses nothing and sends no text twice."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import torch

from tuwen.pipeline.settings import Settings
from tuwen.workers.engine.batch import Engine
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.engine.model import Answer, Item, Runtime
from tuwen.workers.engine.core import Scheduler
from tuwen.workers.engine.policy import Limits

SAMPLES = bundled_demo_model().parent / "samples"


@pytest.fixture(scope="module")
def rt() -> Runtime:
    runtime = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=48))
    runtime.load()
    return runtime


@pytest.fixture(scope="module")
def samples() -> list[tuple[bytes, str, str]]:
    entries = json.loads((SAMPLES / "samples.json").read_text("utf-8"))
    return [((SAMPLES / e["file"]).read_bytes(), e["question"], e["facts"][0]) for e in entries]


def collect(scheduler: Scheduler, items: list[Item], interactive: bool) -> tuple[Any, dict[int, Answer], dict[int, float]]:
    answers: dict[int, Answer] = {}
    at: dict[int, float] = {}

    def on_answer(i: int, a: Answer) -> None:
        answers[i] = a
        at[i] = time.perf_counter()

    ticket = scheduler.submit(scheduler.runtime.prepare(items), interactive=interactive, on_answer=on_answer)
    return ticket, answers, at


def test_an_interactive_job_joins_a_running_bulk_batch(rt: Runtime, samples: list[tuple[bytes, str, str]]) -> None:
    """Bulk answers are made 40 tokens long (the benchmark hook), so the batch is still running when the
    interactive job (a natural ~10-token answer) arrives; it must join and finish long before them."""
    bulk_items = [Item(img, q, 48) for img, q, _ in samples[:6]] * 2
    rt.min_new_tokens = 40
    try:
        alone = {i: rt.answer_batch([it])[0].tokens for i, it in enumerate(bulk_items)}
        bulk_group = rt.prepare(bulk_items)
    finally:
        rt.min_new_tokens = 0
    steps: list[tuple[int, int]] = []
    scheduler = Scheduler(rt, max_rows=16)
    scheduler.on_step.append(lambda running, waiting: steps.append((running, waiting)))
    scheduler.start()
    try:
        bulk_answers: dict[int, Answer] = {}
        bulk_at: dict[int, float] = {}
        bulk = scheduler.submit(bulk_group, interactive=False,
                                on_answer=lambda i, a: (bulk_answers.__setitem__(i, a),
                                                        bulk_at.__setitem__(i, time.perf_counter())))
        deadline = time.monotonic() + 30
        while len(steps) < 3 and time.monotonic() < deadline:  # the bulk rows are decoding
            time.sleep(0.001)
        assert steps and not bulk.done.is_set()
        img, q, fact = samples[8]
        quick, quick_answers, quick_at = collect(scheduler, [Item(img, q, 48)], interactive=True)
        assert quick.wait(60) and bulk.wait(120)
    finally:
        scheduler.stop()
    assert fact in (quick_answers[0].answer or "")
    assert quick_answers[0].tokens == rt.answer_batch([Item(img, q, 48)])[0].tokens
    assert quick_at[0] < min(bulk_at.values()), "the interactive job must not wait for the bulk batch"
    assert all(len(a.tokens) >= 40 for a in bulk_answers.values())
    assert max(r for r, _ in steps) == len(bulk_items) + 1, "it joined the running rows"
    assert {i: a.tokens for i, a in bulk_answers.items()} == alone
    assert [r for r, _ in steps] != sorted([r for r, _ in steps]), "finished rows left the batch"


def test_out_of_memory_on_join_splits_the_group(rt: Runtime, samples: list[tuple[bytes, str, str]]) -> None:
    items = [Item(img, q, 48) for img, q, _ in samples[:8]]
    alone = [rt.answer_batch([it])[0].tokens for it in items]
    sizes: list[int] = []

    def oom_from_4(size: int) -> None:
        sizes.append(size)
        if size >= 4:
            raise torch.OutOfMemoryError(f"injected for {size} rows")

    scheduler = Scheduler(rt, max_rows=16).start()
    rt.before_generate = oom_from_4
    try:
        ticket, answers, _ = collect(scheduler, items, interactive=True)
        assert ticket.wait(120)
    finally:
        rt.before_generate = None
        scheduler.stop()
    assert sizes[0] == 8 and any(s < 4 for s in sizes), "the group of 8 failed to join and went in smaller parts"
    assert [answers[i].tokens for i in range(8)] == alone
    assert all(a.ok for a in answers.values())


class FailingOnce(Engine):
    """An engine whose decode step runs out of memory once, at step ``at``."""

    def __init__(self, *args: Any, at: int, fired: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.fired, self.steps = at, fired, 0

    def step(self) -> Any:
        self.steps += 1
        if self.steps == self.at and not self.fired.is_set():
            self.fired.set()
            raise torch.OutOfMemoryError("injected in a decode step")
        return super().step()


def test_out_of_memory_mid_decode_restarts_rows_without_sending_text_twice(
        rt: Runtime, samples: list[tuple[bytes, str, str]]) -> None:
    fired = threading.Event()
    base = rt.engine()
    scheduler = Scheduler(rt, max_rows=16)

    def failing_engine() -> Engine:
        return FailingOnce(base.model, base.processor, base.eos, base.pad, at=4, fired=fired)

    scheduler.engine = failing_engine()
    streamed: dict[int, list[str]] = {}
    items = []
    for i, (img, q, _) in enumerate(samples[:4]):
        streamed[i] = []
        items.append(Item(img, q, 48, on_text=streamed[i].append))
    scheduler.start()
    try:
        ticket, answers, _ = collect(scheduler, items, interactive=True)
        assert ticket.wait(120)
    finally:
        scheduler.stop()
    assert fired.is_set()
    for i, (img, q, fact) in enumerate(samples[:4]):
        assert answers[i].ok and fact in (answers[i].answer or "")
        assert "".join(streamed[i]) == answers[i].answer, "streamed text must equal the answer, sent once"


def test_an_interactive_job_joins_a_full_batch_where_a_bulk_job_waits(
        rt: Runtime, samples: list[tuple[bytes, str, str]]) -> None:
    """Rows that joined together finish together, so a full batch can go a whole answer without a free
    row: an interactive group may take ``interactive_extra`` rows beyond ``max_rows``, a bulk group may not."""
    rt.min_new_tokens = 40
    try:
        bulk_group = rt.prepare([Item(img, q, 48) for img, q, _ in samples[:6]])
        late_group = rt.prepare([Item(samples[7][0], samples[7][1], 48)])
    finally:
        rt.min_new_tokens = 0
    steps: list[tuple[int, int]] = []
    scheduler = Scheduler(rt, max_rows=6)
    assert scheduler.interactive_extra == 1
    scheduler.on_step.append(lambda running, waiting: steps.append((running, waiting)))
    scheduler.start()
    try:
        bulk, _, _ = collect_group(scheduler, bulk_group, interactive=False)
        deadline = time.monotonic() + 30
        while len(steps) < 3 and time.monotonic() < deadline:  # the batch is full and decoding
            time.sleep(0.001)
        late, _, _ = collect_group(scheduler, late_group, interactive=False)
        img, q, fact = samples[8]
        quick, quick_answers, _ = collect(scheduler, [Item(img, q, 48)], interactive=True)
        assert quick.wait(60)
        assert not bulk.done.is_set() and not late.done.is_set(), "it did not wait for a row to leave"
        assert bulk.wait(120) and late.wait(120)
    finally:
        scheduler.stop()
    assert fact in (quick_answers[0].answer or "")
    assert max(r for r, _ in steps) == 7, "6 bulk rows and the interactive one; the late bulk row waited"


def collect_group(scheduler: Scheduler, group: Any, interactive: bool) -> tuple[Any, dict[int, Answer], None]:
    answers: dict[int, Answer] = {}
    ticket = scheduler.submit(group, interactive=interactive, on_answer=lambda i, a: answers.__setitem__(i, a))
    return ticket, answers, None


def test_rows_on_their_way_count_against_free_rows_until_they_arrive(rt: Runtime,
                                                                     samples: list[tuple[bytes, str, str]]) -> None:
    """A hand-over being prepared holds its rows: the consumer must not hand the same free rows over twice."""
    scheduler = Scheduler(rt, max_rows=16).start()
    try:
        assert scheduler.free_rows == 16 and scheduler.ahead == 0
        first, second = scheduler.expect(8), scheduler.expect(6)
        assert scheduler.free_rows == 2 and scheduler.ahead == 14
        group = rt.prepare([Item(image, question, 8) for image, question, _ in samples[:8]])
        ticket = scheduler.submit(group, interactive=False)
        first()
        first()  # a second call changes nothing
        second()  # these six never came (their jobs ended before the decode loop)
        assert ticket.wait(60)
        assert scheduler.free_rows == 16 and scheduler.ahead == 0
        assert all(a.ok for a in group.answers)
    finally:
        scheduler.stop()


def test_bulk_rows_give_way_to_an_interactive_job_and_come_back_where_they_left_off(
        rt: Runtime, samples: list[tuple[bytes, str, str]]) -> None:
    """With ``beside_interactive=2``, 10 of 12 running bulk rows are parked while the interactive job decodes
    (it runs in a batch of 3), then come back with their cache: every answer is token-identical to the same
    row alone, and streamed bulk text is sent once."""
    bulk_items = [Item(img, q, 48) for img, q, _ in samples[:6]] * 2
    rt.min_new_tokens = 40
    try:
        alone = {i: rt.answer_batch([it])[0].tokens for i, it in enumerate(bulk_items)}
        streamed: dict[int, list[str]] = {i: [] for i in range(len(bulk_items))}
        bulk_group = rt.prepare([Item(it.image, it.question, 48, on_text=streamed[i].append)
                                 for i, it in enumerate(bulk_items)])
    finally:
        rt.min_new_tokens = 0
    steps: list[tuple[int, int]] = []
    scheduler = Scheduler(rt, 16, limits=Limits(16, beside_interactive=2))
    scheduler.on_step.append(lambda running, waiting: steps.append((running, scheduler.parked)))
    scheduler.start()
    try:
        bulk, bulk_answers, _ = collect_group(scheduler, bulk_group, interactive=False)
        deadline = time.monotonic() + 30
        while len(steps) < 3 and time.monotonic() < deadline:  # the bulk rows are decoding
            time.sleep(0.001)
        assert steps and not bulk.done.is_set()
        img, q, fact = samples[8]
        quick, quick_answers, _ = collect(scheduler, [Item(img, q, 48)], interactive=True)
        assert quick.wait(60)
        during = list(steps)
        assert not bulk.done.is_set(), "the bulk rows were still out of the batch when the interactive job ended"
        assert bulk.wait(120)
    finally:
        scheduler.stop()
    assert fact in (quick_answers[0].answer or "")
    assert quick_answers[0].tokens == rt.answer_batch([Item(img, q, 48)])[0].tokens
    assert (3, 10) in during, "the interactive job decoded beside 2 bulk rows, 10 parked"
    assert max(r for r, p in during if p) <= 3
    assert steps[-1][1] == 0 and max(r for r, _ in steps[len(during):]) == 12, "all 12 came back"
    assert {i: a.tokens for i, a in bulk_answers.items()} == alone
    assert all("".join(streamed[i]) == a.answer for i, a in bulk_answers.items()), "streamed once, in order"
