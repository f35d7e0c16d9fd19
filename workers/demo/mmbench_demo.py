"""An MMBench-format TSV drawn from the demo task: four-option multiple-choice questions about shape,
colour, count and arithmetic pictures, question text in Chinese, pictures as base64 PNG.

    python -m tuwen.workers.demo.mmbench_demo demo-mmbench.tsv --per-kind 25
    tuwen eval demo-mmbench.tsv --circular --prompt plain

The seed is one the demo model was never trained on. Pure Pillow; no torch.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import random
import re
from pathlib import Path

from tuwen.workers.demo.scenes import COLOURS, MAX_COUNT, SHAPES, Example, draw_training_example, draw_worksheet_example

SEED = 555_001
KINDS = ("shape", "colour", "count", "arithmetic")
COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "split", "image")


def choices(ex: Example, rng: random.Random) -> tuple[str, list[str]]:
    """The right option text and three wrong ones for a demo example."""
    if ex.kind == "shape":
        right = ex.facts[0]
        return right, rng.sample([s for s in SHAPES if s != right], 3)
    if ex.kind == "colour":
        right = ex.facts[0]
        return right, rng.sample([c for c in COLOURS if c != right], 3)
    if ex.kind == "count":
        right = ex.facts[0]
        return right, rng.sample([f"{n}个" for n in range(1, MAX_COUNT + 1) if f"{n}个" != right], 3)
    m = re.match(r"(\d+)([+-])(\d+)=(\d+)", ex.answer)
    assert m, ex.answer
    a, b, r = int(m.group(1)), int(m.group(3)), int(m.group(4))
    pool = sorted({a, b, r - 2, r - 1, r + 1, r + 2, r + 3} - {r})
    return str(r), [str(x) for x in rng.sample([x for x in pool if 0 <= x <= 18], 3)]


def rows(per_kind: int = 25, seed: int = SEED, style: str = "training") -> list[dict[str, str]]:
    """``per_kind`` questions of each kind, options shuffled, as TSV rows."""
    rng = random.Random(seed)
    draw = draw_training_example if style == "training" else draw_worksheet_example
    out: list[dict[str, str]] = []
    for kind in KINDS:
        for _ in range(per_kind):
            ex = draw(rng, kind)
            right, wrong = choices(ex, rng)
            options = [right, *wrong]
            rng.shuffle(options)
            buf = io.BytesIO()
            ex.image.save(buf, format="PNG")
            out.append({"index": str(len(out)), "question": ex.question, "hint": "",
                        **dict(zip("ABCD", options)), "answer": "ABCD"[options.index(right)], "category": kind,
                        "split": "dev", "image": base64.b64encode(buf.getvalue()).decode("ascii")})
    return out


def write_tsv(path: Path, per_kind: int = 25, seed: int = SEED, style: str = "training") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows(per_kind, seed, style))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-kind", type=int, default=25)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--style", choices=("training", "worksheet"), default="training")
    args = parser.parse_args()
    write_tsv(args.out, args.per_kind, args.seed, args.style)
    print(args.out)


if __name__ == "__main__":
    main()
