"""docs/education.md's worked example, run as written (a bash block, in an empty folder, against the session
worker with the demo model): a 3-page worksheet PDF, 4 questions a page, results and the report, JSON answers.
Every plain answer names the facts of its page; every JSON answer is valid against the schema."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.scenes import draw_worksheet_example, has_facts

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
KINDS = ("shape", "colour", "count", "describe")


@pytest.mark.timeout(240)
def test_the_worked_example_runs_as_written(worker: WorkerProcess, pipeline_settings: Settings, tmp_path: Path) -> None:
    doc = (REPO / "docs" / "education.md").read_text(encoding="utf-8")
    block = re.search(r"## Worked example.*?```bash\n(.*?)```", doc, re.S)
    assert block is not None
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, **pipeline_settings.to_env(),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the installed `tuwen` and python
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    # Page by page, each page's four questions together, with file and page
    assert [(x["file"], x["page"]) for x in lines] == [("worksheet.pdf", p) for p in (1, 2, 3) for _ in KINDS]
    # Every plain answer names its page's facts: a shape, colour or count scene drawn from the page's seed is the
    # page's picture; a description names all three
    facts = {p: {k: draw_worksheet_example(random.Random(p), k).facts for k in KINDS[:3]} for p in (1, 2, 3)}
    for page in facts.values():
        page["describe"] = page["count"] + page["colour"] + page["shape"]
    wrong = [(x["page"], x["question"], x["answer"]) for i, x in enumerate(lines)
             if not has_facts(x["answer"] or "", facts[x["page"]][KINDS[i % 4]])]
    assert len(wrong) <= 1, wrong  # the demo model: about 95% of questions right
    # And every JSON answer is an object of the schema, for the same pages and questions
    schema = json.loads((tmp_path / "answer.json").read_text(encoding="utf-8"))
    graded = [json.loads(x) for x in (tmp_path / "graded.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(x["page"], x["question"]) for x in graded] == [(x["page"], x["question"]) for x in lines]
    for x in graded:
        jsonschema.validate(json.loads(x["answer"]), schema)
    report = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert all(report.count(f"worksheet.pdf · 第{p}页 p. {p}") == 4 for p in (1, 2, 3))
