"""The bundled sample pictures and questions the demo submits (drawn from a seed never trained on)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tuwen.workers.demo.scenes import KINDS, draw_training_example, draw_worksheet_example

SAMPLES_SEED = 999_001
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


@dataclass(frozen=True)
class Sample:
    path: Path
    question: str
    reference: str
    facts: tuple[str, ...]


def write_samples(directory: Path = SAMPLES_DIR) -> list[Sample]:
    """Draw two pictures per question type (one of each drawing style) and save them with an index."""
    rng = random.Random(SAMPLES_SEED)
    directory.mkdir(parents=True, exist_ok=True)
    index = []
    for kind in KINDS:
        for style, draw in (("photo", draw_training_example), ("worksheet", draw_worksheet_example)):
            ex = draw(rng, kind)
            name = f"{kind}-{style}.png"
            ex.image.save(directory / name, optimize=True)
            index.append({"file": name, "question": ex.question, "reference": ex.answer, "facts": list(ex.facts)})
    (directory / "samples.json").write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return load_samples(directory)


def load_samples(directory: Path = SAMPLES_DIR) -> list[Sample]:
    index = json.loads((directory / "samples.json").read_text(encoding="utf-8"))
    return [Sample(directory / e["file"], e["question"], e["reference"], tuple(e["facts"])) for e in index]
