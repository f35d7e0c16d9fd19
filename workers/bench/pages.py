"""Bench rows p: one page asked 1, 4 and 10 questions, with reuse (``engine.reuse``) against without.

The checkpoint is the bench model's language model behind LLaVA-1.5's picture geometry (336 px, 14 px
patches: 576 picture tokens; the questions are 8-16 tokens), built once like the other bench checkpoint.
A page's questions join the engine together, as the hand-over sends a page's jobs (``policy.affinity_order``);
each measurement has an engine and caches of its own (nothing carries over between measurements), and every
answer is forced to the same length, so rows differ only in what they prefill. ``ps10`` asks the ten
questions one after another instead (each a join of its own, after the last answer): the prefix cache's case.
Every row checks that its answers are token for token those without reuse.

    tuwen bench --rows pages --repeats 3
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuwen.workers.bench import roofline
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.engine.model import Item, Runtime
from tuwen.workers.engine.reuse import Reuse

#: LLaVA-1.5's picture: 336 px in 14 px patches, 576 picture tokens.
PAGE_PICTURE = (336, 14)
#: Ten questions one asks of a worksheet page (transcribe, grade, tag, rate, ...).
PAGE_QUESTIONS = ["请抄写这道题。", "这道题答对了吗？", "这道题考的是什么知识点？", "这道题难不难？",
                  "图中是什么形状？", "这是什么颜色？", "数一数，图中一共有几个图形？", "算一算，结果是多少？",
                  "描述这张图片。", "这道口算题的答案是几？"]
SIZES = (1, 4, 10)


@dataclass
class Page:
    """One measurement: CPU seconds of this process in all and in the joins' prefill (to every row's first
    token; the rest is decode), wall seconds, each row's tokens, and the caches used."""

    seconds: float
    prefill_s: float
    tokens: list[list[int]]
    reuse: Reuse | None
    wall_s: float = 0.0


def measure(rt: Runtime, picture: bytes, questions: list[str], answer_tokens: int, reuse: bool,
            one_by_one: bool = False) -> Page:
    """Answer ``questions`` about ``picture`` on a fresh engine (fresh caches with ``reuse``)."""
    engine = rt.engine()
    engine.reuse = Reuse(rt.model, 256 << 20, 512 << 20) if reuse else None
    groups = [[q] for q in questions] if one_by_one else [questions]
    prepared = [rt.prepare([Item(picture, q, answer_tokens) for q in group]) for group in groups]
    wall, t0, prefill, finished = time.perf_counter(), time.process_time(), 0.0, []
    for group in prepared:
        t = time.process_time()
        finished += engine.add(group.rows, group.enc)
        prefill += time.process_time() - t
        while engine.size:
            finished += engine.step()
    seconds = time.process_time() - t0
    order = {id(r): i for g in prepared for i, r in enumerate(g.rows)}
    tokens = [f.tokens for f in sorted(finished, key=lambda f: order[id(f.row)])]
    return Page(seconds, prefill, tokens, engine.reuse, time.perf_counter() - wall)


def rows(opts: Any, table: Any, log: Callable[[str], None]) -> None:
    """The p rows into ``table`` (``run.Table``), ``opts.repeats`` interleaved repeats."""
    picture_size = PAGE_PICTURE if opts.shape == roofline.BenchShape() else (112, 14)  # --quick: 64 tokens
    rt = roofline.load(roofline.bench_checkpoint(opts.shape, opts.cache_dir, picture_size), 8)
    answer_tokens = 8 if opts.shape == roofline.BenchShape() else 3
    rt.min_new_tokens = answer_tokens
    picture = next(s for s in load_samples() if "worksheet" in s.path.name).path.read_bytes()
    tok = rt.processor.tokenizer
    asked = [len(tok(q, add_special_tokens=False)["input_ids"]) for q in PAGE_QUESTIONS]
    picture_tokens = (picture_size[0] // picture_size[1]) ** 2
    measure(rt, picture, PAGE_QUESTIONS[:1], answer_tokens, True)  # warm-up
    shares: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}  #: per repeat, over one question of the same repeat (reuse on / off)
    ones: dict[bool, float] = {}
    last: dict[str, Page] = {}
    for rep in range(opts.repeats):
        for n in SIZES:
            pages = {on: measure(rt, picture, PAGE_QUESTIONS[:n], answer_tokens, on) for on in (True, False)}
            same = pages[True].tokens == pages[False].tokens
            same = same and all(len(t) == answer_tokens for t in pages[True].tokens)
            for on, key in ((True, f"p{n}"), (False, f"p{n}x")):
                what = f"a page, {n} question{'s' if n > 1 else ''} in one join, reuse {'on' if on else 'off'}"
                table(key, what, "CPU s/page").add(pages[on].seconds, n if same else 0, n)
                shares.setdefault(key, []).append(pages[on].prefill_s / pages[on].seconds)
                walls.setdefault(key, []).append(pages[on].wall_s)
                last[key] = pages[on]
            for on, suffix in ((True, ""), (False, "x")):  # this repeat's ratio: its rows ran side by side
                ratios.setdefault(f"p{n}{suffix}", []).append(pages[on].seconds / ones[on] if n > 1 else 1.0)
                if n == 1:
                    ones[on] = pages[on].seconds
        one_by_one = measure(rt, picture, PAGE_QUESTIONS, answer_tokens, True, one_by_one=True)
        same = one_by_one.tokens == last["p10x"].tokens
        table("ps10", "a page, 10 questions one after another, reuse on", "CPU s/page").add(
            one_by_one.seconds, 10 if same else 0, 10)
        shares.setdefault("ps10", []).append(one_by_one.prefill_s / one_by_one.seconds)
        walls.setdefault("ps10", []).append(one_by_one.wall_s)
        ratios.setdefault("ps10", []).append(one_by_one.seconds / ones[True])
        last["ps10"] = one_by_one
        log(f"[{rep + 1}] page rows done")
    for key, page in last.items():
        share = statistics.median(shares[key])
        table[key].note = (f"prefill {100 * share:.0f}% / decode {100 - 100 * share:.0f}%; wall "
                           f"{statistics.median(walls[key]):.1f} s ({min(walls[key]):.1f}–{max(walls[key]):.1f})"
                           + _caches(page.reuse))
        if key != "p1" and key != "p1x":
            r = ratios[key]
            table[key].note += f"; **{statistics.median(r):.2f}× one question** ({min(r):.2f}–{max(r):.2f})"
    table["p1"].note += (f"; {picture_tokens} picture tokens, questions {min(asked)}-{max(asked)} tokens "
                         f"({picture_tokens / max(asked):.0f}× the longest); answers {answer_tokens} tokens each")


def _caches(reuse: Reuse | None) -> str:
    if reuse is None:
        return ""
    f, rows = reuse.features, reuse.prefix_hits + reuse.prefix_misses
    return (f"; encoder cache {f.hits}/{f.hits + f.misses} hits, {f.used / 2**20:.1f} MiB; prefix cache "
            f"{reuse.prefix_hits}/{rows} rows hit, {reuse.prefixes.used / 2**20:.1f} MiB")


def targets(table: Any) -> list[str]:
    ratio = table["p10"].median / table["p1"].median  # medians of CPU seconds (the note has each repeat's ratio)
    ok = all(r.all_ok for r in table.rows.values())
    return [f"a page's 10 questions ≤ 2.5× one question with reuse: {ratio:.2f}× — "
            f"{'met' if ratio <= 2.5 else 'missed'}",
            f"answers with reuse token for token those without: {'met' if ok else 'missed'}"]
