"""What the demo speech model hears: the picture demo's questions and the numbers around them.

* every question the picture demo asks (``scenes.QUESTIONS``, ``{shape}`` filled with each shape);
* spoken sums and counts in hanzi numerals ("八减二等于几？", "图中有三个红色的圆形吗？") and the numbers
  零 to 十 on their own.

A fixed part of the sums and counts is held out: training never says those sentences, and the evaluation
reports them on their own row (can the model spell a sentence it never heard whole?). Pure Python.
"""

from __future__ import annotations

from tuwen.workers.demo.scenes import COLOURS, QUESTIONS, SHAPES

NUMERALS = "零一二三四五六七八九十"
#: Counts before a classifier: 2 is 两 ("两个"), as a pupil says it.
COUNT_WORDS = ("一", "两", "三", "四")


def demo_questions() -> list[str]:
    """Every question the picture demo asks, with ``{shape}`` filled in."""
    out: list[str] = []
    for phrases in QUESTIONS.values():
        for phrase in phrases:
            out += [phrase.format(shape=s) for s in SHAPES] if "{shape}" in phrase else [phrase]
    return list(dict.fromkeys(out))


def sums() -> list[str]:
    """One-digit sums and differences, asked two ways (the arithmetic the demo draws: results 0-18)."""
    out = []
    for a in range(10):
        for b in range(10):
            for op in ("加", "减"):
                if op == "减" and b > a:
                    continue
                for ask in ("等于几？", "等于多少？"):
                    out.append(f"{NUMERALS[a]}{op}{NUMERALS[b]}{ask}")
    return out


def counts() -> list[str]:
    """Yes/no questions about how many shapes of a colour the picture has."""
    return [f"图中有{n}个{c}的{s}吗？" for n in COUNT_WORDS for c in COLOURS for s in SHAPES]


def numbers() -> list[str]:
    return [f"{n}。" for n in NUMERALS]


def _held_out(sentence: str) -> bool:
    """A fixed, spread-out ~15% of the sums and counts (by a stable hash of the text)."""
    return sum(sentence.encode("utf-8")) % 7 == 3


def sentences(split: str) -> list[str]:
    """``"train"``: what training says. ``"held_out"``: sums and counts training never says."""
    generated = sums() + counts()
    if split == "train":
        return demo_questions() + numbers() + [s for s in generated if not _held_out(s)]
    if split == "held_out":
        return [s for s in generated if _held_out(s)]
    raise ValueError(f"unknown split {split!r}")


def characters() -> list[str]:
    """Every character any sentence uses (training and held-out), in first-seen order."""
    text = "".join(demo_questions() + numbers() + sums() + counts())
    return list(dict.fromkeys(text))
