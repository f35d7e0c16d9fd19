"""MMBench(-CN) evaluation through the queue: read the TSV, ask every question as one bulk, score.

The TSV has a header with at least ``index``, ``question``, ``A``, ``B`` (``C``, ``D`` optional: some
questions have two or three options) and ``image`` (base64; a short all-digit value refers to the image
of the row with that index). ``hint``, ``answer`` (the right letter) and ``category`` are optional.

**Letter extraction** (``extract_letter``), in this order:

1. An explicit letter: the answer *starts* with one of the question's letters standing alone (``B``,
   ``B.``, ``(B)``, ``B、三角形``), or a letter follows a cue (``答案是B``, ``选B``, ``选项：C``,
   ``answer is D``).
2. Else an option's *text* found in the answer (after dropping spaces and trailing punctuation, and
   full-width to half-width): when several options are found, a match inside a longer match does
   not count (longest match: ``正方形`` beats ``方形``), and of the rest the one that ends last wins (the
   conclusion comes last: ``8-0=9`` with options 8 and 9 answers 9). A number only matches a whole
   number (``1`` is not found in ``14``).
3. Else no letter: the question counts as wrong.

**CircularEval** (``--circular``): each question is asked once per rotation of its options (n options,
n rotations; rotation k puts the option at letter i onto letter (i - k) mod n, and the right letter
moves with it); it counts as right only when every rotation is. Rotated copies get index
``index + 1_000_000 · k``, as in MMBench's own files; a TSV that already holds such copies is used as
given.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import re
import threading
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from tuwen.pipeline.bulk.manifest import Record, RecordSource
from tuwen.pipeline.bulk.model import Bulk
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.bulk.submission import SubmitProgress
from tuwen.pipeline.errors import InvalidInput

LETTERS = ("A", "B", "C", "D")
ROTATION = 1_000_000


class PromptStyle(str, Enum):
    #: MMBench's usual prompt: hint, question, the lettered options, "answer with the letter".
    options = "options"
    #: Hint and question only, for models that answer in free text and were never shown option lists.
    plain = "plain"


@dataclass(frozen=True)
class Question:
    index: int
    question: str
    options: dict[str, str]  #: letter → option text, in letter order
    image_b64: str
    hint: str = ""
    answer: str | None = None
    category: str = ""

    @property
    def group(self) -> int:
        return self.index % ROTATION


def _cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    text = "" if value is None else str(value).strip()
    return "" if text.lower() == "nan" else text


def read_tsv(path: Path) -> list[Question]:
    """All questions of an MMBench TSV, image references resolved."""
    csv.field_size_limit(2**31 - 1)  # base64 pictures are far longer than csv's default field limit
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or any(c not in rows[0] for c in ("index", "question", "A", "B", "image")):
        raise InvalidInput(f"{path} is not an MMBench TSV (needs index, question, A, B, image columns)",
                           code="invalid_manifest")
    images = {_cell(r, "index"): _cell(r, "image") for r in rows}
    out = []
    for r in rows:
        image = _cell(r, "image")
        if image.isdigit() and len(image) <= 64:  # a reference to another row's picture
            image = images.get(image, "")
        options = {k: _cell(r, k) for k in LETTERS if _cell(r, k)}
        out.append(Question(int(float(_cell(r, "index"))), _cell(r, "question"), options, image,
                            _cell(r, "hint"), _cell(r, "answer").upper() or None, _cell(r, "category")))
    return out


def rotate(q: Question, k: int) -> Question:
    """The question with its options rotated by ``k`` (letter i gets the option of letter i + k)."""
    letters = list(q.options)
    n = len(letters)
    texts = [q.options[x] for x in letters]
    options = {letters[i]: texts[(i + k) % n] for i in range(n)}
    answer = letters[(letters.index(q.answer) - k) % n] if q.answer in letters else q.answer
    return replace(q, index=q.group + ROTATION * (k % n), options=options, answer=answer)


def groups(questions: list[Question], circular: bool) -> list[list[Question]]:
    """Questions grouped by original index: one per group, or every rotation with ``circular``."""
    by_group: dict[int, list[Question]] = defaultdict(list)
    for q in questions:
        by_group[q.group].append(q)
    out = []
    for g in sorted(by_group):
        qs = sorted(by_group[g], key=lambda q: q.index)
        if not circular:
            out.append(qs[:1])
        elif len(qs) > 1:  # the file holds its own rotated copies
            out.append(qs)
        else:
            out.append([rotate(qs[0], k) for k in range(len(qs[0].options))])
    return out


def prompt(q: Question, style: PromptStyle) -> str:
    head = f"提示：{q.hint}\n" if q.hint else ""
    if style == PromptStyle.plain:
        return head + q.question
    lines = "\n".join(f"{k}. {v}" for k, v in q.options.items())
    return f"{head}{q.question}\n{lines}\n请直接回答选项字母。"


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"\s+", "", text).rstrip("。.，,！!？?；;：:")


_CUE = re.compile(r"(?:答案|选项|应选|选择|选|answer|option)\s*(?:是|为|is|:|：)?\s*[(（]?([A-D])(?![A-Za-z])", re.IGNORECASE)


def extract_letter(answer: str | None, options: dict[str, str]) -> str | None:
    """The option letter an answer chooses, or None (rules in the module docstring)."""
    if not answer:
        return None
    text = unicodedata.normalize("NFKC", answer).strip()
    start = re.match(r"^[(\[]?([A-D])(?:$|[).\]、:：,，\s])", text)
    if start and start.group(1) in options:
        return start.group(1)
    cue = _CUE.search(text)
    if cue and cue.group(1).upper() in options:
        return cue.group(1).upper()
    flat = _norm(text)
    spans: list[tuple[int, int, str]] = []
    for letter, option in options.items():
        needle = _norm(option)
        if not needle:
            continue
        pattern = re.escape(needle)
        if needle[0].isdigit():
            pattern = r"(?<!\d)" + pattern
        if needle[-1].isdigit():
            pattern += r"(?!\d)"
        spans += [(m.start(), m.end(), letter) for m in re.finditer(pattern, flat)]
    kept = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0] for o in spans)]
    if not kept:
        return None
    return max(kept, key=lambda s: (s[1], s[1] - s[0]))[2]


def _records(items: list[Question], style: PromptStyle) -> Iterator[Record]:
    for n, q in enumerate(items, 1):
        try:
            data = base64.b64decode(q.image_b64, validate=False)
        except ValueError:
            data = b""
        yield Record(n, str(q.index), None, prompt(q, style), data=data)


def score(grouped: list[list[Question]], answers: dict[str, str | None]) -> dict[str, Any]:
    """Accuracy overall and per category; a group is right when every question in it is."""
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    items: list[dict[str, Any]] = []
    right_total = 0
    for group in grouped:
        preds: list[dict[str, Any]] = []
        for q in group:
            chosen = extract_letter(answers.get(str(q.index)), q.options)
            preds.append({"index": q.index, "answer": q.answer, "response": answers.get(str(q.index)),
                          "letter": chosen, "correct": chosen is not None and chosen == q.answer})
        ok = all(p["correct"] for p in preds)
        cat = group[0].category or "(none)"
        per_cat[cat][0] += ok
        per_cat[cat][1] += 1
        right_total += ok
        items.append({"index": group[0].group, "category": cat, "correct": ok, "predictions": preds})
    n = len(grouped)
    return {
        "questions": n,
        "correct": right_total,
        "accuracy": right_total / n if n else 0.0,
        "unanswered": sum(p["letter"] is None for i in items for p in i["predictions"]),
        "per_category": {c: {"questions": t, "correct": r, "accuracy": r / t} for c, (r, t) in sorted(per_cat.items())},
        "items": items,
    }


def evaluate(store: BulkStore, path: Path, *, circular: bool = False, style: PromptStyle = PromptStyle.options,
             owner: str = "eval", fresh: bool = False, timeout: float | None = None,
             stop: threading.Event | None = None, on_progress: Callable[[SubmitProgress], None] | None = None,
             on_update: Callable[[Bulk], None] | None = None) -> dict[str, Any]:
    """Run the TSV through the queue as one bulk (resumable like any bulk) and score it."""
    questions = read_tsv(path)
    grouped = groups(questions, circular)
    flat = [q for g in grouped for q in g]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    h.update(f"mmbench\0{circular}\0{style.value}".encode())
    source = RecordSource(f"mmbench:{path.name}", lambda: _records(flat, style), h.hexdigest())
    bulk = store.submit(source, owner=owner, fresh=fresh, stop=stop, on_progress=on_progress,
                         metadata={"kind": "mmbench", "file": path.name, "circular": str(circular).lower(),
                                   "prompt": style.value})
    if not (stop is not None and stop.is_set()):
        bulk = store.wait(bulk.id, timeout=timeout, on_update=on_update)
    lines = list(store.results(bulk.id))
    report = score(grouped, {r["custom_id"]: r["answer"] for r in lines})
    models = sorted({r["model_id"] for r in lines if r.get("model_id")})
    return {"file": str(path), "bulk_id": bulk.id, "bulk_state": bulk.state.value, "circular": circular,
            "prompt": style.value, "model_ids": models, **report}
