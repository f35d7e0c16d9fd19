"""Key-fact accuracy of a checkpoint on held-out demo pictures, through the production runtime.

An answer counts as right when it states every key fact (shape, colour, count, result) and nothing that
contradicts it (``scenes.has_facts``: bounded matching, not a substring test). Two styles: pictures from
the training generator, and 224×224 worksheet pages drawn by a separate layout path
(``draw_worksheet_example``).

Two splits, drawn from seeds that training never uses: ``dev`` is the set the recipe was tuned on
(look at it as often as you like; it is never reported), ``test`` is the set the documentation reports
(``tuwen eval-demo``). Seed 777001 was once both; it is the dev set now.
"""

from __future__ import annotations

import time
from pathlib import Path

from tuwen.pipeline.settings import Settings
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.demo.scenes import KINDS, has_facts, held_out_set
from tuwen.workers.engine.model import Item, Runtime

#: ``{split: {style: seed}}``. ``dev`` tunes the recipe and is never reported; ``test`` is reported.
SEEDS = {
    "dev": {"training": 777_001, "worksheet": 888_001},
    "test": {"training": 731_001, "worksheet": 842_001},
}
STYLES = ("training", "worksheet")


def evaluate(
    checkpoint: Path | None = None,
    *,
    per_kind: int = 200,
    styles: tuple[str, ...] = STYLES,
    split: str = "test",
    batch_size: int = 32,
    threads: int = 1,
    runtime: Runtime | None = None,
) -> dict[str, dict[str, float]]:
    """``{style: {kind: accuracy, ..., "overall": accuracy}}`` with ``per_kind`` pictures per type."""
    rt = runtime or Runtime(Settings(model_path=checkpoint or bundled_demo_model(), torch_threads=threads,
                                     max_new_tokens=32))
    table: dict[str, dict[str, float]] = {}
    for style in styles:
        examples = held_out_set(SEEDS[split][style], per_kind, style)
        right = {k: 0 for k in KINDS}
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            answers = rt.answer_batch([Item(e.image, e.question) for e in chunk])
            for e, a in zip(chunk, answers):
                right[e.kind] += bool(a.answer) and has_facts(a.answer or "", e.facts)
        row = {k: right[k] / per_kind for k in KINDS}
        row["overall"] = sum(right.values()) / len(examples)
        table[style] = row
    return table


def format_table(table: dict[str, dict[str, float]], per_kind: int) -> str:
    """A Markdown table: one row per question type, one column per picture style."""
    styles = list(table)
    head = "| question type | " + " | ".join(f"{s} ({per_kind}/type)" for s in styles) + " |"
    lines = [head, "|---|" + "---|" * len(styles)]
    for kind in [*KINDS, "overall"]:
        lines.append(f"| {kind} | " + " | ".join(f"{table[s][kind] * 100:.1f}%" for s in styles) + " |")
    return "\n".join(lines)


def main(checkpoint: Path | None, per_kind: int, threads: int) -> str:
    """The reported table (``test`` split), as ``tuwen eval-demo`` prints it."""
    t0 = time.time()
    table = evaluate(checkpoint, per_kind=per_kind, threads=threads)
    return format_table(table, per_kind) + f"\n\n({time.time() - t0:.0f} s)"
