"""Character error rate of a speech checkpoint on held-out synthetic Mandarin, through the generic HF path.

Every clip is spoken at a rate and a noise level that training never used (``synth.HELD_OUT``), from seeds
that training never draws. Rows:

* ``questions``: the picture demo's questions (``corpus.demo_questions``);
* ``sums and counts``: the spoken sums, counts and numbers training says;
* ``unseen sentences``: sums and counts training never says whole (``corpus.sentences("held_out")``);
* ``unseen voices``: the questions in espeak-ng voice variants training never used.

CER = character edits (insertions, deletions, substitutions) / reference characters, punctuation and
spaces left out of both; "exact" is the share of transcripts equal to the reference, punctuation included.
Two splits: ``dev`` is looked at while changing the recipe, ``test`` is the one reported.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tuwen.workers.demo.speech import bundled_speech_model, corpus, synth

#: First clip seed of each split (clip i uses seed + i); training seeds are drawn from its own Random(seed).
SEEDS = {"dev": 5_100_000, "test": 7_300_000}
ROWS = ("questions", "sums and counts", "unseen sentences", "unseen voices")
PUNCTUATION = set("，。？！、：；（）“”,.?!:;() \t")


def row_sentences(row: str) -> list[str]:
    train = set(corpus.sentences("train"))
    if row in ("questions", "unseen voices"):
        return corpus.demo_questions()
    if row == "sums and counts":
        return [s for s in corpus.sums() + corpus.counts() + corpus.numbers() if s in train]
    if row == "unseen sentences":
        return corpus.sentences("held_out")
    raise ValueError(f"unknown row {row!r}")


def held_out_clips(row: str, n: int, split: str = "test") -> list[tuple[str, np.ndarray]]:
    """``n`` clips of a row: ``(reference text, float32 samples at 16 kHz)``, reproducible from the split."""
    sentences = row_sentences(row)
    conditions = synth.HELD_OUT
    if row == "unseen voices":
        conditions = replace(conditions, variants=synth.UNSEEN_VARIANTS)
    base = SEEDS[split] + 10_000 * ROWS.index(row)
    clips = []
    for i in range(n):
        rng = random.Random(base + i)
        text = rng.choice(sentences)
        audio, _ = synth.speak(text, seed=base + i, voice=synth.Voice.draw(rng, conditions))
        clips.append((text, audio))
    return clips


def load(checkpoint: Path | None = None):  # -> (model, processor)
    """The generic path any Whisper checkpoint takes: ``AutoModelForSpeechSeq2Seq`` + ``AutoProcessor``."""
    import torch
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    path = checkpoint or bundled_speech_model()
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def transcribe(model, processor, audios: list[np.ndarray], batch_size: int = 16) -> list[str]:
    """Greedy transcripts, ``batch_size`` clips per ``generate`` call."""
    import torch

    out: list[str] = []
    for start in range(0, len(audios), batch_size):
        chunk = audios[start:start + batch_size]
        features = processor(chunk, sampling_rate=synth.SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = model.generate(input_features=features)
        out += processor.batch_decode(ids, skip_special_tokens=True)
    return out


def _plain(text: str) -> str:
    return "".join(ch for ch in text if ch not in PUNCTUATION)


def edits(reference: str, hypothesis: str) -> int:
    """Levenshtein distance between two strings, by characters."""
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        current = [i]
        for j, h in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def score(references: list[str], transcripts: list[str]) -> dict[str, float]:
    """``{"cer", "exact", "clips"}`` over a set of clips (CER pooled over characters, not averaged per clip)."""
    wrong = sum(edits(_plain(r), _plain(t)) for r, t in zip(references, transcripts))
    total = sum(len(_plain(r)) for r in references)
    exact = sum(r == t for r, t in zip(references, transcripts))
    return {"cer": wrong / max(1, total), "exact": exact / max(1, len(references)), "clips": len(references)}


def evaluate(
    checkpoint: Path | None = None,
    *,
    per_row: int = 200,
    split: str = "test",
    rows: tuple[str, ...] = ROWS,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """``{row: {"cer", "exact", "clips"}}`` with ``per_row`` held-out clips per row."""
    import torch

    torch.set_num_threads(threads)
    model, processor = load(checkpoint)
    table = {}
    for row in rows:
        clips = held_out_clips(row, per_row, split)
        table[row] = score([t for t, _ in clips], transcribe(model, processor, [a for _, a in clips]))
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| held-out set | clips | CER | exact transcripts |", "|---|---|---|---|"]
    for row, s in table.items():
        lines.append(f"| {row} | {s['clips']:.0f} | {s['cer'] * 100:.2f}% | {s['exact'] * 100:.1f}% |")
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - manual entry point
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--per-row", type=int, default=200)
    ap.add_argument("--split", choices=sorted(SEEDS), default="test")
    a = ap.parse_args()
    t0 = time.time()
    print(format_table(evaluate(a.checkpoint, per_row=a.per_row, split=a.split)))
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":  # pragma: no cover
    main()
