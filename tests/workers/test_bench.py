"""``tuwen bench --quick``: the table has every row, each the median of 3 repeats with its min–max and all its
jobs succeeded. Speed is not asserted (a shared 2-core machine); the shape is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuwen.workers.bench.run import Row
from tuwen.workers.bench.workload import lengths
from tuwen.workers.bench.fleet import noise_pictures
from tuwen.workers.bench.roofline import Machine, roofline

ROWS = ["L1", "L2", "r1", "hf1", "k1", "r16", "hf16", "k16", "s16", "r64", "hf64", "k64", "s64", "a", "b", "c", "m",
        "mb", "mc", "d", "e", "e0", "e1", "f", "g1", "g2", "h50", "h95", "i50", "i95", "ib", "n50", "n95", "nb"]
LINE = re.compile(r"^\| (?P<key>[\w]+) \| (?P<what>[^|]+) \| (?P<median>[\d.]+) (?P<unit>[^|]+) \| "
                  r"(?P<low>[\d.]+)–(?P<high>[\d.]+) \| (?P<ok>\d+)/(?P<total>\d+) \| (?P<note>.*) \|$")


def test_roofline_is_bandwidth_bound_at_batch_1_and_compute_bound_at_batch_16() -> None:
    """The issue's machine: 85 GFLOPS, 19 GB/s; a 478M fp32 Llama is ~10 tok/s at 1 and ~89 tok/s at 16."""
    machine = Machine(gflops=85, bandwidth_gbs=19)
    one, limit_one = roofline(machine, 478_000_000, 4 * 478_000_000, 1)
    sixteen, limit_sixteen = roofline(machine, 478_000_000, 4 * 478_000_000, 16)
    assert (limit_one, limit_sixteen) == ("bandwidth", "compute")
    assert one == pytest.approx(9.9, abs=0.1) and sixteen == pytest.approx(88.9, abs=0.1)


def test_transport_pictures_are_distinct_within_and_across_repeats() -> None:
    """Row e used to repeat 64 pictures ~16 times, so content-addressed storage skipped most uploads."""
    first, second = noise_pictures(200, seed=1), noise_pictures(200, seed=2)
    assert len(set(first)) == 200 and not set(first) & set(second)


def test_mixed_workload_is_a_quarter_long() -> None:
    sizes = lengths(64, 8, 64)
    assert sizes.count(64) == 16 and sizes.count(8) == 48


def test_a_row_is_the_median_of_its_repeats() -> None:
    row = Row("c", "x", "answers/s")
    for value in (32.6, 42.1, 39.4):
        row.add(value, 16, 16)
    assert row.median == 39.4 and (row.succeeded, row.total, row.all_ok) == (48, 48, True)


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_bench_quick_prints_every_row_from_three_repeats_with_all_jobs_succeeded(tmp_path: Path) -> None:
    # Given the quick sizes and a fresh cache directory for the bench checkpoint
    out = tmp_path / "table.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}
    # When the command runs (its real worker processes, Redis and storage, all started by itself)
    proc = subprocess.run([sys.executable, "-m", "tuwen.workers.cli", "bench", "--quick", "--cache-dir",
                           str(tmp_path / "build"), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=390)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text("utf-8")
    # Then every row is there, in order, each with 3 repeats' median inside its min–max
    rows = {m["key"]: m for m in map(LINE.match, text.splitlines()) if m}
    assert list(rows) == ROWS, text
    for key, m in rows.items():
        assert float(m["low"]) <= float(m["median"]) <= float(m["high"]), (key, m.group(0))
        # And every row checked its jobs: all succeeded
        assert int(m["total"]) > 0 and m["ok"] == m["total"], (key, m.group(0))
    assert "3 interleaved repeats" in text.splitlines()[0]
    # The decode rows stand beside the roofline, the mixed row beside the pipeline, with answers compared
    assert re.search(r"roofline [\d.]+ tok/s \((bandwidth|compute)-bound\): \*\*\d+%\*\*", rows["r16"]["note"])
    assert re.search(r"× pipeline\*\*.*same answers as pipeline (\d+)/\1", rows["m"]["note"])
    assert "2 workers answered; 0 jobs ran twice" in rows["g2"]["note"]
    # Interactive latency over HTTP stands beside the same without giving way, and beside its own idle
    assert re.search(r"\*\*[\d.]+× faster than n50\*\*; last repeat: idle p50 \d+ ms", rows["i50"]["note"])
    assert "what giving way costs the backlog" in rows["ib"]["note"]
    # What limits decode: skinny GEMM at 1/16/64 rows and a profile of one step
    assert "| weight (out × in) | 1 row | 16 rows | 64 rows |" in text
    assert "One decode step at batch 16 (torch.profiler" in text and "| GEMM (linear) |" in text
    assert re.search(r"\*\*[\d.]+× free rows \(r16\)\*\*; masks of all 16 rows [\d.]+ ms", rows["s16"]["note"])
    assert len(re.findall(r"^- .*: (met|missed)", text, re.M)) == 10
