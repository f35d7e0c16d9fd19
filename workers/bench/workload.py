"""Rows a–c and m of ``tuwen bench``, in-process on one loaded model (the demo by default).

* (a) processor + ``generate`` per request; (b) ``transformers.pipeline("image-text-to-text",
  batch_size=16)``; (c) tuwen's runtime, static batches of 16.
* (m) the mixed workload: 75% short answers, 25% long ones, lengths forced per row (benchmark only:
  ``min_new_tokens`` = ``max_new_tokens`` per engine row; a logits processor for ``generate``). tuwen's
  continuous batching (every row through one ``Scheduler``, fed as rows free up, as the worker's
  hand-over does) against the pipeline and against tuwen's own static batches, on the same inputs;
  the answers are compared.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from typing import Any

from tuwen.workers.demo.scenes import KINDS, draw_training_example
from tuwen.workers.engine.model import Answer, Item, Runtime
from tuwen.workers.engine.core import Scheduler
from tuwen.workers.engine.policy import plan

#: The batch size of the static rows and of the pipeline, and the rows of the continuous batch.
BATCH = 16


# -- inputs -------------------------------------------------------------------------------------------
def inputs(n: int, seed: int = 4242) -> list[tuple[bytes, str]]:
    """Distinct worksheet pictures with their questions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = draw_training_example(rng, KINDS[i % len(KINDS)])
        buf = BytesIO()
        ex.image.save(buf, format="PNG")
        out.append((buf.getvalue(), ex.question))
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# -- in-process rows (demo model) -----------------------------------------------------------------------
def seed_way(rt: Runtime, data: list[tuple[bytes, str]], max_new_tokens: int) -> tuple[float, int]:
    """(a) one request at a time, processor + generate."""
    import torch
    from PIL import Image

    processor, model = rt.processor, rt.model

    def run() -> int:
        done = 0
        for image, question in data:
            prompt = processor.apply_chat_template(rt.messages(question), add_generation_prompt=True)
            enc = processor(images=[Image.open(BytesIO(image)).convert("RGB")], text=[prompt], return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            done += out.shape[1] > enc["input_ids"].shape[1]
        return done

    seconds, done = timed(run)
    return len(data) / seconds, done


def _pipeline(rt: Runtime) -> Any:
    from transformers import pipeline

    return pipeline("image-text-to-text", model=rt.model, processor=rt.processor, batch_size=BATCH)


def _conversations(data: list[tuple[bytes, str]]) -> list[list[dict[str, Any]]]:
    from PIL import Image

    return [[{"role": "user", "content": [{"type": "image", "image": Image.open(BytesIO(img)).convert("RGB")},
                                          {"type": "text", "text": q}]}] for img, q in data]


def hf_pipeline(rt: Runtime, data: list[tuple[bytes, str]], max_new_tokens: int) -> tuple[float, int]:
    """(b) ``pipeline("image-text-to-text", batch_size=16)``."""
    pipe, chats = _pipeline(rt), _conversations(data)
    seconds, out = timed(lambda: pipe(text=chats, generate_kwargs={"max_new_tokens": max_new_tokens,
                                                                  "do_sample": False}, return_full_text=False))
    return len(data) / seconds, sum(1 for o in out if o and o[0].get("generated_text") is not None)


def runtime_batched(rt: Runtime, data: list[tuple[bytes, str]], max_new_tokens: int) -> tuple[float, int, float]:
    """(c) tuwen's runtime, static batches of 16; also the median time of one batch (row h's unit)."""
    items = [Item(img, q, max_new_tokens) for img, q in data]
    answers: list[Answer] = []
    batch_s = []
    for i in range(0, len(items), BATCH):
        seconds, out = timed(lambda: rt.answer_batch(items[i:i + BATCH]))  # noqa: B023 - called at once
        answers += out
        batch_s.append(seconds)
    return len(data) / sum(batch_s), sum(a.ok for a in answers), statistics.median(batch_s)


# -- the mixed workload ----------------------------------------------------------------------------------
def lengths(n: int, short: int, long: int) -> list[int]:
    """Every fourth answer long, the rest short."""
    return [long if i % 4 == 3 else short for i in range(n)]


def _forced(rt: Runtime, data: list[tuple[bytes, str]], sizes: list[int]) -> Any:
    """A prepared group whose rows answer exactly ``sizes`` tokens (the benchmark forces lengths)."""
    group = rt.prepare([Item(img, q, size) for (img, q), size in zip(data, sizes)])
    for row in group.rows:
        row.min_new_tokens = row.max_new_tokens = sizes[row.key]
    return group


def mixed_continuous(rt: Runtime, data: list[tuple[bytes, str]],
                     sizes: list[int]) -> tuple[float, list[str], int, dict[str, float]]:
    """All rows through one ``Scheduler``: a feeder hands rows over as the batching policy says (as the
    worker's hand-over does), short rows leave when done and waiting rows join between steps. Also returns
    where the time went: joins (each a prefill, written below the running rows), their rows, steps."""
    scheduler = Scheduler(rt, max_rows=BATCH)
    changed = threading.Event()
    steps = [0]
    joins: list[tuple[int, float]] = []
    add = scheduler.engine.add

    def timed_add(rows: Any, enc: Any = None) -> Any:
        t0 = time.perf_counter()
        try:
            return add(rows, enc)
        finally:
            joins.append((len(rows), time.perf_counter() - t0))

    step = scheduler.engine.step

    def counted_step() -> Any:
        steps[0] += 1
        return step()

    def stepped(running: int, waiting: int) -> None:
        changed.set()

    scheduler.engine.add = timed_add
    scheduler.engine.step = counted_step
    scheduler.on_step.append(stepped)
    answers: dict[int, Answer] = {}

    def answered(take: list[int]) -> Any:
        def on_answer(i: int, answer: Answer) -> None:
            answers[take[i]] = answer
            changed.set()
        return on_answer

    scheduler.start()
    try:
        t0 = time.perf_counter()
        nxt = 0
        while len(answers) < len(data):
            # The worker's hand-over, with every input already buffered: the policy says how many go now.
            todo = plan(scheduler.limits, replace(scheduler.view(), buffered=len(data) - nxt, waited_s=math.inf))
            if todo.hand_over:
                for start in range(nxt, nxt + todo.hand_over, todo.group):
                    take = list(range(start, min(nxt + todo.hand_over, start + todo.group)))
                    group = _forced(rt, [data[i] for i in take], [sizes[i] for i in take])
                    scheduler.submit(group, interactive=False, on_answer=answered(take))
                nxt += todo.hand_over
                continue
            if not scheduler.alive:
                raise RuntimeError("the decode loop stopped")
            changed.wait(0.05)
            changed.clear()
        seconds = time.perf_counter() - t0
    finally:
        scheduler.stop()
    texts = [answers[i].answer or "" for i in range(len(data))]
    ok = sum(answers[i].ok and len(answers[i].tokens) == sizes[i] for i in range(len(data)))
    where = {"joins": len(joins), "rows_per_join": sum(n for n, _ in joins) / max(1, len(joins)),
             "join_share": sum(s for _, s in joins) / seconds, "steps": steps[0]}
    return len(data) / seconds, texts, ok, where


def mixed_static(rt: Runtime, data: list[tuple[bytes, str]], sizes: list[int]) -> tuple[float, list[str], int]:
    """tuwen's engine, static batches of 16: each batch runs until its longest row ends."""
    texts, ok = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(data), BATCH):
        group = _forced(rt, data[i:i + BATCH], sizes[i:i + BATCH])
        for f in rt.engine().run(group.rows, group.enc):
            texts.append(f.text)
            ok += len(f.tokens) == sizes[i + f.row.key]
    return len(data) / (time.perf_counter() - t0), texts, ok


class _ForceLengths:
    """A ``generate`` logits processor: row ``i`` of the batch ends after exactly ``sizes[i]`` tokens."""

    def __init__(self, sizes: list[int], eos: list[int]) -> None:
        self.sizes, self.eos, self.start = sizes, eos, None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.start = self.start if self.start is not None else input_ids.shape[1]
        made = input_ids.shape[1] - self.start
        for i, size in enumerate(self.sizes):
            if made < size:
                scores[i, self.eos] = float("-inf")
            else:
                scores[i, :] = float("-inf")
                scores[i, self.eos[0]] = 0.0
        return scores


def mixed_pipeline(rt: Runtime, data: list[tuple[bytes, str]], sizes: list[int]) -> tuple[float, list[str], int]:
    """``transformers.pipeline(batch_size=16)`` on the same inputs, lengths forced per row."""
    from transformers import LogitsProcessorList

    eos = rt.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    pipe, chats, texts = _pipeline(rt), _conversations(data), []
    t0 = time.perf_counter()
    for i in range(0, len(data), BATCH):
        force = LogitsProcessorList([_ForceLengths(sizes[i:i + BATCH], eos)])
        out = pipe(text=chats[i:i + BATCH], return_full_text=False,
                   generate_kwargs={"max_new_tokens": max(sizes) + 1, "do_sample": False, "logits_processor": force})
        texts += [o[0]["generated_text"] for o in out]
    return len(data) / (time.perf_counter() - t0), texts, len(texts)


def same(a: list[str], b: list[str]) -> int:
    return sum(x.strip() == y.strip() for x, y in zip(a, b))
