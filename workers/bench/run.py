"""``tuwen bench``: one run, one table. Every row is the median of ``repeats`` interleaved repeats (repeat 1
of every row, then repeat 2 of every row, ...), shown with its min–max, and counts its jobs that succeeded.

* The limit (``workers.roofline``, a ~410M-parameter bench checkpoint): this machine's GEMM GFLOPS and
  bandwidth at one thread; decode tokens/s of tuwen's engine and of HF ``generate`` at batch 1, 16 and
  the worker's ``max_batch_size``, beside the roofline's bound.
* In-process, demo model: (a) processor + ``generate`` per request; (b) ``transformers.pipeline``,
  batch_size=16; (c) tuwen's runtime, static batches of 16; (m) the mixed workload: 75% short, 25% long
  answers, tuwen's continuous batching against (b) and (c) on the same inputs, answers compared.
* Through Redis and real worker processes (``workers.fleet``): (d) end to end; (e) transport alone with
  the null model, (e0) its upload-bound submission, (e1) bulk submission of lines naming stored pictures;
  (f) one job on an idle system; (g) equal thread budgets; (h) an interactive job's first token during a
  bulk backlog.
* Over HTTP, real gateway and worker processes (``workers.http``): (i) an interactive chat completion
  during a bulk backlog against the same idle, bulk rows giving way; (n) the same where they never do.

torch runs at one thread everywhere; this 2-core machine is shared and noisy, so compare ratios from one
run, not absolute numbers.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuwen.pipeline.settings import CpuLinear, Settings
from tuwen.workers.bench import pages, roofline, workload
from tuwen.workers.bench.fleet import Fleet
from tuwen.workers.bench.http import HttpSetups
from tuwen.workers.bench.workload import BATCH
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.engine.model import Runtime


@dataclass(frozen=True)
class Options:
    inputs: int = 64  #: (picture, question) inputs for rows a–d and m
    max_new_tokens: int = 24  #: rows a–d, f–h (natural answer lengths up to this)
    transport_jobs: int = 1000  #: row e
    bulk_lines: int = 5000  #: row e1
    repeats: int = 3
    decode_steps: int = 24  #: timed decode steps per decode row
    batches: tuple[int, ...] = (1, 16)  #: decode rows (the worker's max_batch_size is added)
    max_batch_size: int = 64  #: the workers' (``TUWEN_MAX_BATCH_SIZE``, its default)
    short_tokens: int = 8  #: row m
    long_tokens: int = 64  #: row m
    idle_rounds: int = 10  #: row f, per repeat
    interactive_jobs: int = 10  #: row h, per repeat
    backlog: int = 240  #: row h: bulk jobs queued before the interactive ones
    http_samples: int = 20  #: row i: chat completions idle and during the backlog, per repeat and set-up
    http_backlog: int = 2400  #: row i: bulk jobs queued before them
    shape: roofline.BenchShape = roofline.BenchShape()
    cache_dir: Path = Path("build")
    model_path: Path | None = None  #: the demo model for rows a–h (default: the bundled one)
    #: ``all``: the whole table; ``pages``: only rows p (a page asked 1, 4 and 10 questions, ``bench.pages``).
    rows: str = "all"

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        """Small sizes for the smoke test: every row, in seconds."""
        small = dict(inputs=8, max_new_tokens=8, transport_jobs=48, bulk_lines=200, decode_steps=3, short_tokens=3,
                     long_tokens=10, idle_rounds=3, interactive_jobs=2, backlog=48, http_samples=2, http_backlog=600,
                     shape=roofline.QUICK_SHAPE)
        return cls(**{**small, **overrides})


@dataclass
class Row:
    key: str
    what: str
    unit: str
    values: list[float] = field(default_factory=list)
    succeeded: int = 0
    total: int = 0
    note: str = ""

    def add(self, value: float, succeeded: int, total: int) -> None:
        self.values.append(value)
        self.succeeded += succeeded
        self.total += total

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def all_ok(self) -> bool:
        return self.succeeded == self.total


@dataclass
class Report:
    header: str
    rows: list[Row]
    targets: list[str]
    limits: str

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def markdown(self) -> str:
        lines = [self.header, "", "| row | what | median | min–max | jobs ok | note |", "|---|---|---:|---:|---:|---|"]
        for r in self.rows:
            ok = f"{r.succeeded}/{r.total}" + ("" if r.all_ok else " **FAILED**")
            lines.append(f"| {r.key} | {r.what} | {_num(r.median)} {r.unit} | {_num(min(r.values))}–"
                         f"{_num(max(r.values))} | {ok} | {r.note} |")
        return "\n".join([*lines, "", "Targets:", *[f"- {t}" for t in self.targets], "", self.limits])


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.0f}" if abs(x) >= 1000 else f"{x:.1f}"


class Table:
    """Rows in order of first use."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def __call__(self, key: str, what: str, unit: str) -> Row:
        return self.rows.setdefault(key, Row(key, what, unit))

    def __getitem__(self, key: str) -> Row:
        return self.rows[key]


# -- the run -----------------------------------------------------------------------------------------------
def run(opts: Options, log: Callable[[str], None] = print) -> Report:
    import torch

    torch.set_num_threads(1)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    table = Table()
    if opts.rows == "pages":
        pages.rows(opts, table, log)
        header = (f"tuwen bench --rows pages — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                  f"{platform.node()}, load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at "
                  f"the end, torch 1 thread, {opts.repeats} interleaved repeats; took "
                  f"{time.perf_counter() - t_start:.0f}s")
        return Report(header, list(table.rows.values()), pages.targets(table), "")
    batches = sorted({*opts.batches, opts.max_batch_size})
    checkpoint = roofline.bench_checkpoint(opts.shape, opts.cache_dir)
    big = roofline.load(checkpoint, opts.decode_steps + 2)  # what a CPU worker runs: oneDNN linear layers
    big_aten = roofline.load(checkpoint, opts.decode_steps + 2, CpuLinear.aten)  # PyTorch's default kernels
    params, weight_bytes = roofline.decode_weights(big.model)
    top = max(opts.max_new_tokens, opts.long_tokens)
    demo = Runtime(Settings(model_path=opts.model_path or bundled_demo_model(), torch_threads=1,
                            max_new_tokens=top))
    demo.load()
    data = workload.inputs(opts.inputs)
    sizes = workload.lengths(opts.inputs, opts.short_tokens, opts.long_tokens)
    workload.runtime_batched(demo, data[:BATCH], opts.max_new_tokens)  # warm-up
    answers_match: list[tuple[int, int]] = []
    mask_ms: dict[int, float] = {}  #: the last repeat's grammar masks per step, by batch
    batch_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tuwen-bench-") as tmp, \
            Fleet(Path(tmp), opts.model_path, opts.max_batch_size, opts.max_new_tokens) as fleet, \
            HttpSetups(Path(tmp), opts.model_path, opts.max_batch_size, opts.max_new_tokens) as http:
        fleet.warm_up(data, opts.max_new_tokens)
        http.warm_up(data)
        log(f"workers ready and warm after {time.perf_counter() - t_start:.0f}s")
        for rep in range(opts.repeats):
            machine = roofline.measure_machine()
            table("L1", "machine: peak GEMM 2048², fp32, 1 thread (the better of torch.mm and oneDNN)",
                  "GFLOPS").add(machine.gflops, 1, 1)
            table["L1"].note = (f"last repeat: torch.mm {machine.mm_gflops:.0f}, oneDNN {machine.onednn_gflops:.0f} "
                                "GFLOPS")
            table("L2", "machine: memory bandwidth (sum / GEMV over 512 MB, 1 thread)", "GB/s").add(
                machine.bandwidth_gbs, 1, 1)
            for b in batches:
                rate, ok, _ = roofline.engine_decode(big, b, opts.decode_steps)
                table(f"r{b}", f"tuwen engine decode, batch {b} (bench model)", "tok/s").add(rate, ok, 1)
                rate, ok = roofline.hf_decode(big, b, opts.decode_steps)
                table(f"hf{b}", f"HF generate decode, batch {b} (bench model, the same kernels)", "tok/s").add(
                    rate, ok, 1)
                rate, ok, _ = roofline.engine_decode(big_aten, b, opts.decode_steps)
                table(f"k{b}", f"tuwen engine decode, batch {b}, PyTorch's default linear (aten)", "tok/s").add(
                    rate, ok, 1)
                if b >= 16:
                    rate, ok, masks = roofline.engine_decode(big, b, opts.decode_steps, roofline.SIX_FIELDS)
                    table(f"s{b}", f"tuwen engine decode, batch {b}, every row constrained by a 6-field JSON schema",
                          "tok/s").add(rate, ok, 1)
                    mask_ms[b] = masks * 1000
            log(f"[{rep + 1}] limit rows done at {time.perf_counter() - t_start:.0f}s")
            rate, ok = workload.seed_way(demo, data, opts.max_new_tokens)
            table("a", "processor + model.generate per request", "answers/s").add(rate, ok, len(data))
            rate, ok = workload.hf_pipeline(demo, data, opts.max_new_tokens)
            table("b", 'transformers.pipeline("image-text-to-text", batch_size=16)', "answers/s").add(
                rate, ok, len(data))
            rate, ok, one_batch = workload.runtime_batched(demo, data, opts.max_new_tokens)
            table("c", "tuwen runtime in-process, static batches of 16", "answers/s").add(rate, ok, len(data))
            batch_s.append(one_batch)
            rate, cont, ok, where = workload.mixed_continuous(demo, data, sizes)
            table("m", f"mixed 75% {opts.short_tokens} / 25% {opts.long_tokens} tokens: tuwen continuous (16 rows)",
                  "answers/s").add(rate, ok, len(data))
            rate, pipe, ok = workload.mixed_pipeline(demo, data, sizes)
            table("mb", "mixed: transformers.pipeline(batch_size=16)", "answers/s").add(rate, ok, len(data))
            rate, static, ok = workload.mixed_static(demo, data, sizes)
            table("mc", "mixed: tuwen engine, static batches of 16", "answers/s").add(rate, ok, len(data))
            answers_match.append((workload.same(cont, pipe), workload.same(cont, static)))
            table["mc"].note = (f"continuous, last repeat: {where['joins']:.0f} joins of {where['rows_per_join']:.1f} rows "
                                f"on average took {100 * where['join_share']:.0f}% of its time; {where['steps']:.0f} "
                                f"decode steps (static: {-(-len(data) // BATCH)} prefills, "
                                f"{-(-len(data) // BATCH) * opts.long_tokens} steps)")
            log(f"[{rep + 1}] in-process rows done at {time.perf_counter() - t_start:.0f}s")
            fleet.measure(table, rep, data, opts, statistics.median(batch_s))
            log(f"[{rep + 1}] queue rows done at {time.perf_counter() - t_start:.0f}s")
            http.measure(table, data, opts)
            log(f"[{rep + 1}] HTTP rows done at {time.perf_counter() - t_start:.0f}s")
    _notes(table, batches, machine_median(table), params, weight_bytes, answers_match, len(data))
    for b, ms in mask_ms.items():
        step_ms = 1000 * b / table[f"r{b}"].median
        table[f"s{b}"].note = (f"**{table[f's{b}'].median / table[f'r{b}'].median:.2f}× free rows (r{b})**; masks of "
                               f"all {b} rows {ms:.2f} ms of a {step_ms:.0f} ms step (last repeat)")
    limits = roofline.explain(big, BATCH)
    header = (f"tuwen bench — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
              f"{os.cpu_count()} CPUs, load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at "
              f"the end, torch 1 thread, {opts.repeats} interleaved repeats, {opts.inputs} inputs, max_new_tokens={opts.max_new_tokens}; bench "
              f"model {params / 1e6:.0f}M decode parameters ({weight_bytes / 1e9:.2f} GB fp32); took "
              f"{time.perf_counter() - t_start:.0f}s. Shared, noisy machine: compare ratios from one run.")
    return Report(header, list(table.rows.values()), targets(table, batches, params, weight_bytes), limits)


def machine_median(table: Table) -> roofline.Machine:
    return roofline.Machine(gflops=table["L1"].median, bandwidth_gbs=table["L2"].median)


def _notes(table: Table, batches: list[int], machine: roofline.Machine, params: int, weight_bytes: int,
           match: list[tuple[int, int]], n: int) -> None:
    for b in batches:
        bound, limit = roofline.roofline(machine, params, weight_bytes, b)
        r, hf = table[f"r{b}"], table[f"hf{b}"]
        r.note = f"roofline {bound:.1f} tok/s ({limit}-bound): **{100 * r.median / bound:.0f}%**"
        hf.note = f"{100 * hf.median / bound:.0f}% of roofline; tuwen {r.median / hf.median:.2f}×"
        k = table[f"k{b}"]
        k.note = f"{100 * k.median / bound:.0f}% of roofline; oneDNN (r{b}) {r.median / k.median:.2f}× this"
    m, mb, mc = table["m"], table["mb"], table["mc"]
    m.note = (f"**{m.median / mb.median:.2f}× pipeline**, {m.median / mc.median:.2f}× static; same answers as "
              f"pipeline {min(x for x, _ in match)}/{n}, as static {min(y for _, y in match)}/{n} (worst repeat)")
    table["b"].note = f"{table['b'].median / table['a'].median:.2f}× a"
    table["c"].note = f"{table['c'].median / table['a'].median:.2f}× a, {table['c'].median / table['b'].median:.2f}× b"
    table["d"].note = f"**{table['d'].median / table['c'].median:.2f}× c**"
    g1, g2 = table["g1"], table["g2"]
    g2.note = f"**{g2.median / g1.median:.2f}× g1**; " + g2.note
    for q in (50, 95):
        table[f"i{q}"].note = (f"**{table[f'n{q}'].median / table[f'i{q}'].median:.2f}× faster than n{q}**; "
                               + table[f"i{q}"].note)
    table["ib"].note = f"{table['ib'].median / table['nb'].median:.2f}× nb: what giving way costs the backlog"


def targets(table: Table, batches: list[int], params: int, weight_bytes: int) -> list[str]:
    machine = machine_median(table)

    def eff(b: int) -> float:
        bound, _ = roofline.roofline(machine, params, weight_bytes, b)
        return float(table[f"r{b}"].median / bound)

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    top = max(batches)
    m = table["m"].median / table["mb"].median
    h50, h95 = table["h50"].median, table["h95"].median
    i50, i95 = table["i50"].median, table["i95"].median
    constrained = {b: table[f"s{b}"].median / table[f"r{b}"].median for b in batches if b >= 16}
    d = table["d"].median / table["c"].median
    e, e1 = table["e"].median, table["e1"].median
    return [f"decode at batch 16 ≥ 50% of roofline: {verdict(eff(16) >= 0.5)} ({100 * eff(16):.1f}%)",
            f"decode at the worker's largest batch ({top}) ≥ 60%: {verdict(eff(top) >= 0.6)} ({100 * eff(top):.1f}%)",
            f"mixed workload ≥ 1.5× pipeline: {verdict(m >= 1.5)} ({m:.2f}×)",
            f"interactive first token p50 ≤ 0.5 batch: {verdict(h50 <= 0.5)} ({h50:.2f}); "
            f"p95 ≤ 1: {verdict(h95 <= 1)} ({h95:.2f})",
            f"interactive chat over HTTP during a bulk backlog ≤ 2× idle at p50: {verdict(i50 <= 2)} ({i50:.2f}×; "
            f"{table['n50'].median:.2f}× when bulk rows never give way); ≤ 3× at p95: {verdict(i95 <= 3)} "
            f"({i95:.2f}×; {table['n95'].median:.2f}×)",
            f"d ≥ 0.9× c: {verdict(d >= 0.9)} ({d:.2f}×)",
            "decode with every row constrained by a 6-field schema ≥ 0.9× free rows: "
            f"{verdict(min(constrained.values()) >= 0.9)} ("
            + ", ".join(f"{v:.2f}× at {b}" for b, v in constrained.items()) + ")",
            f"e (null-model drain, distinct pictures) ≥ 300 jobs/s: {verdict(e >= 300)} ({e:.0f})",
            f"e1 (bulk submission of stored pictures) ≥ 2,000 lines/s: {verdict(e1 >= 2000)} ({e1:.0f}; "
            f"upload-bound e0 {table['e0'].median:.0f} jobs/s)",
            "every row's jobs succeeded: " + verdict(all(r.all_ok for r in table.rows.values()))]
