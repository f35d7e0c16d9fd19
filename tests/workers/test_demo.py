"""The README's first command: ``make demo`` runs ``tuwen demo``, which starts its own Redis, storage and
worker, asks the bundled pictures through the queue and prints one line that says how many answers name
the right facts. Run here as a user would, in a subprocess, with nothing of the tests' services."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tuwen.workers.demo.speech.evaluate import score

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_tuwen_demo_answers_every_bundled_picture_right() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}
    out = subprocess.run([sys.executable, "-m", "tuwen.workers.cli", "demo"], env=env, capture_output=True,
                         text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = re.search(r"(\d+)/(\d+) answers name the right facts; (\d+) jobs in", out.stdout)
    assert line is not None, out.stdout[-3000:]
    assert line.group(1) == line.group(2) == line.group(3) == "10", line.group(0)
    assert out.stdout.count("问：") == 8 and out.stdout.count("问（语音）：") == 2 and out.stdout.count("✓") == 10
    # the two spoken questions were heard: each line shows what the speech stage transcribed
    heard = re.findall(r"问（语音）：(\S+)\s+听到：(\S+)", out.stdout)
    assert len(heard) == 2 and score([s for s, _ in heard], [t for _, t in heard])["cer"] <= 0.1, heard
