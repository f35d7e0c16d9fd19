"""MMBench: TSV reading, option rotation, letter extraction (no services), and an evaluation of the demo
model through the queue on a TSV generated from the demo task."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tuwen.pipeline.bulk.mmbench import (
    ROTATION,
    PromptStyle,
    Question,
    evaluate,
    extract_letter,
    groups,
    prompt,
    read_tsv,
    rotate,
    score,
)
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.settings import Settings
from tests.bulk.conftest import cli
from tuwen.workers.demo.mmbench_demo import KINDS, write_tsv

SHAPES = {"A": "圆形", "B": "三角形", "C": "正方形", "D": "五角星"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("answer", "options", "letter"), [
    ("B", SHAPES, "B"),
    ("B. 三角形", SHAPES, "B"),
    ("(C)", SHAPES, "C"),
    ("答案是D。", SHAPES, "D"),
    ("选项：A", SHAPES, "A"),
    ("图中是三角形。", SHAPES, "B"),  # the option's text, no letter
    ("图中有4个蓝色的三角形。", {"A": "1个", "B": "2个", "C": "3个", "D": "4个"}, "D"),
    ("8-0=9。", {"A": "8", "B": "9", "C": "10", "D": "7"}, "B"),  # the conclusion comes last
    ("9+5=14。", {"A": "1", "B": "4", "C": "14", "D": "5"}, "C"),  # 1 and 4 are not found inside 14
    ("图中是正方形。", {"A": "方形", "B": "正方形"}, "B"),  # longest match
    ("图形是红色的。", {"A": "红 色", "B": "蓝色"}, "A"),  # spaces do not matter
    ("C", {"A": "a", "B": "b"}, None),  # not one of this question's letters
    ("我不知道。", SHAPES, None),
    ("", SHAPES, None),
])
def test_letter_extraction(answer: str, options: dict[str, str], letter: str | None) -> None:
    assert extract_letter(answer, options) == letter


@pytest.mark.timeout(30)
def test_rotations_move_the_right_letter_with_its_option() -> None:
    q = Question(7, "图中是什么形状？", SHAPES, "", answer="B", category="shape")
    rotated = [rotate(q, k) for k in range(4)]
    assert [r.index for r in rotated] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert [r.answer for r in rotated] == ["B", "A", "D", "C"]
    assert all(r.options[r.answer or ""] == "三角形" for r in rotated)
    assert len({tuple(r.options.values()) for r in rotated}) == 4 and rotate(q, 4).options == q.options
    two = Question(8, "q", {"A": "是", "B": "否"}, "", answer="A")
    assert [rotate(two, k).answer for k in range(2)] == ["A", "B"]
    assert [[x.index for x in g] for g in groups([q, two], circular=True)] == [[7, 1_000_007, 2_000_007, 3_000_007],
                                                                               [8, 1_000_008]]
    # a file that already holds rotated copies is used as given
    assert [[x.index for x in g] for g in groups([q, rotate(q, 1)], circular=True)] == [[7, 1_000_007]]
    assert [[x.index for x in g] for g in groups([q, rotate(q, 1)], circular=False)] == [[7]]
    assert prompt(q, PromptStyle.plain) == "图中是什么形状？"
    assert prompt(q, PromptStyle.options).endswith("A. 圆形\nB. 三角形\nC. 正方形\nD. 五角星\n请直接回答选项字母。")


@pytest.mark.timeout(30)
def test_circular_eval_counts_a_question_only_when_every_rotation_is_right() -> None:
    qs = [Question(i, "图中是什么形状？", SHAPES, "", answer="ABCD"[i % 4], category="shape") for i in range(8)]
    grouped = groups(qs, circular=True)
    knows = {str(q.index): q.options[q.answer or ""] for g in grouped for q in g}  # answers the right text
    always_a = {str(q.index): "A" for g in grouped for q in g}  # answers A whatever is asked
    assert score(grouped, knows)["accuracy"] == 1.0
    assert score(groups(qs, circular=False), always_a)["accuracy"] == 0.25
    assert score(grouped, always_a)["accuracy"] == 0.0
    report = score(grouped, {**knows, str(ROTATION + 3): "我不知道"})
    assert (report["correct"], report["unanswered"], report["per_category"]["shape"]["questions"]) == (7, 1, 8)


@pytest.mark.timeout(60)
def test_the_demo_tsv_is_mmbench_format(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "demo.tsv", per_kind=3)
    with path.open(encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t"))
    assert header[:9] == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    qs = read_tsv(path)
    assert len(qs) == 12 and [q.category for q in qs[::3]] == list(KINDS)
    assert all(len(q.options) == 4 and len(set(q.options.values())) == 4 and q.answer in "ABCD" for q in qs)
    assert all("？" in q.question or "。" in q.question for q in qs)
    Image.open(io.BytesIO(base64.b64decode(qs[0].image_b64))).verify()
    assert {q.answer for q in read_tsv(write_tsv(tmp_path / "more.tsv", per_kind=10))} == set("ABCD")
    # a short all-digit image refers to another row's picture (MMBench does this to save space)
    rows = list(csv.DictReader(path.open(encoding="utf-8", newline=""), delimiter="\t"))
    rows[1]["image"] = rows[0]["index"]
    with (tmp_path / "ref.tsv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    assert read_tsv(tmp_path / "ref.tsv")[1].image_b64 == qs[0].image_b64


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_demo_model_scores_far_above_chance_and_rotations_agree(worker: object, store: BulkStore,
                                                               pipeline_settings: Settings, tmp_path: Path) -> None:
    # Given an MMBench-format TSV drawn from the demo task (4 options: chance is 25 %)
    tsv = write_tsv(tmp_path / "demo-mmbench.tsv", per_kind=20)
    # When the demo model answers it through the queue, once and with CircularEval
    single = evaluate(store, tsv, style=PromptStyle.plain, timeout=400)
    res = CliRunner().invoke(cli(), ["eval", str(tsv), "--circular", "--prompt", "plain", "--out",
                                     str(tmp_path / "report.json")], env=pipeline_settings.to_env())
    assert res.exit_code == 0, res.output
    circular = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    print(f"\ndemo MMBench ({single['questions']} questions): single pass {single['accuracy']:.1%}, "
          f"CircularEval {circular['accuracy']:.1%}; per category "
          + ", ".join(f"{c} {r['accuracy']:.0%}" for c, r in circular["per_category"].items()))
    # Then it is far above chance (at least the 90 % that `tuwen eval-demo` must reach; 95 % measured), in
    # every category, and since the plain prompt does not show the options, every rotation gets the same
    # answer text, which must map to the rotated letter: circular == single pass
    assert single["bulk_state"] == "completed" and single["questions"] == 80
    assert single["accuracy"] >= 0.90
    assert all(r["accuracy"] >= 0.80 for r in circular["per_category"].values()), circular["per_category"]
    assert circular["questions"] == 80 and len(circular["items"][0]["predictions"]) == 4
    assert circular["correct"] == single["correct"]
    assert "overall" in res.stdout and "%" in res.stdout
