"""A bulk of spoken questions (issue 28): lines ``{"image", "audio"}`` through ``tuwen bulk submit``, each line
transcribed on the speech queue, then answered, its output line with the transcript. With the untrained speech
model the transcripts are noise: this checks the plumbing and the per-line codes; the answers' facts wait for the
trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tuwen.pipeline.settings import Settings
from tests.bulk.conftest import cli, draw_pictures, write_jsonl
from tests.workers.test_speech import spoken
from tuwen.workers.demo.speech.synth import wav_bytes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
runner = CliRunner()


def test_a_bulk_of_spoken_questions(speech_worker: Any, worker: Any, pipeline_settings: Settings,
                                    tmp_path: Path) -> None:
    """Given six lines with a picture and a WAV each, and two bad ones (silence; no such file), when the bulk runs,
    then six lines succeed with a transcript and an answer, and the two fail with their codes, in input order."""
    pics = draw_pictures(tmp_path / "imgs", 6, seed=2828)
    rows: list[dict[str, Any]] = []
    for i, (path, _) in enumerate(pics):
        (tmp_path / "imgs" / f"q{i}.wav").write_bytes(spoken(seed=100 + i, text=pics[i][1]))
        rows.append({"custom_id": f"口述-{i}", "image": path.name, "audio": f"q{i}.wav"})
    (tmp_path / "imgs" / "quiet.wav").write_bytes(wav_bytes(np.zeros(16_000, np.float32)))
    rows.insert(2, {"custom_id": "silent", "image": pics[0][0].name, "audio": "quiet.wav"})
    rows.append({"custom_id": "gone", "image": pics[1][0].name, "audio": "nope.wav"})
    manifest = write_jsonl(tmp_path / "spoken.jsonl", rows)
    env = pipeline_settings.to_env()
    res = runner.invoke(cli(), ["bulk", "submit", str(manifest), "--images-dir", str(tmp_path / "imgs")], env=env)
    assert res.exit_code == 0, res.output
    bulk_id = res.stdout.strip().splitlines()[-1]
    out = tmp_path / "results.jsonl"
    got = runner.invoke(cli(), ["bulk", "results", bulk_id, "--out", str(out)], env=env)
    assert got.exit_code == 0, got.output
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["custom_id"] for x in lines] == [r["custom_id"] for r in rows]
    failed = {x["custom_id"]: x["error"]["code"] for x in lines if x["status"] != "succeeded"}
    assert failed == {"silent": "no_speech", "gone": "audio_not_found"}
    good = [x for x in lines if x["status"] == "succeeded"]
    assert len(good) == 6 and all(x["transcript"] and x["answer"] is not None and x["model_id"] for x in good)
