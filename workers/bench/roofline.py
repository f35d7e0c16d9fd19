"""The machine's limit for decoding, measured in the same run as the benchmark (``tuwen bench``).

* ``measure_machine``: single-thread peak fp32 GEMM at 2048² (the better of ``torch.mm`` and oneDNN: MKL
  takes a generic path on AMD CPUs, so ``torch.mm`` alone can show half the core) and memory bandwidth
  (summing a tensor far larger than the caches).
* ``bench_checkpoint``: a llava-family checkpoint big enough that decode at batch 1 is memory-bound
  (a ~410M-parameter Llama, random weights, the demo's processor), built offline, seeded, cached.
* ``roofline``: the bound on decode tokens/s, ``batch / max(weight_bytes / bandwidth, 2·params·batch / gflops)``.
* ``engine_decode`` / ``hf_decode``: measured decode tokens/s (decode steps only, prefill excluded) of
  tuwen's engine and of Hugging Face ``generate`` on the same rows.
* ``skinny_linear`` and ``profile_step``: what keeps decode below the bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tuwen.pipeline.settings import CpuLinear, Settings
from tuwen.workers.engine import packed
from tuwen.workers.engine.model import Item, Runtime

#: Text-only prompts for the decode rows: prefill is excluded from them, and a picture would only make
#: the (untimed) prefill of a 410M model on one thread longer.
QUESTIONS = ["描述这张图片。", "图中是什么形状？", "这是什么颜色？", "数一数，图中一共有几个图形？",
             "算一算，结果是多少？", "请你说一说图形涂的是什么颜色。", "图中有什么？", "这道口算题的答案是几？"]


@dataclass(frozen=True)
class Machine:
    gflops: float  #: peak GEMM 2048² fp32, one thread: the better of the two below
    bandwidth_gbs: float  #: reading a large fp32 tensor once, one thread
    mm_gflops: float = 0.0  #: ``torch.mm`` (MKL)
    onednn_gflops: float = 0.0  #: oneDNN with a packed weight (``workers/engine/packed.py``)


@dataclass(frozen=True)
class BenchShape:
    """The language model of the bench checkpoint (the vision tower is the demo's)."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 8
    heads: int = 16


#: --quick: the same family and code path in a fraction of a second.
QUICK_SHAPE = BenchShape(hidden=256, intermediate=704, layers=2, heads=4)


def measure_machine(gemm_n: int = 2048, stream_mb: int = 512) -> Machine:
    """Best of a few runs each (the bound is what the core can do; noise only ever slows it). Bandwidth
    is the faster of summing a large tensor and a matrix-vector product over one (what decode at batch
    1 does to its weights), so that the bound is never set too low."""
    a, b = torch.randn(gemm_n, gemm_n), torch.randn(gemm_n, gemm_n)
    torch.mm(a, b)
    mm = min(_seconds(lambda: torch.mm(a, b)) for _ in range(3))
    onednn = mm
    if packed.available():
        layer = packed.PackedLinear(torch.nn.Linear(gemm_n, gemm_n, bias=False))
        with torch.inference_mode():
            layer(a)
            onednn = min(_seconds(lambda: layer(a)) for _ in range(3))
    big = torch.ones(stream_mb * 2**20 // 4)
    big.sum()
    matrix, vector = big.view(-1, 4096), torch.ones(4096)
    torch.mv(matrix, vector)
    stream = min(min(_seconds(lambda: big.sum()), _seconds(lambda: torch.mv(matrix, vector))) for _ in range(3))
    flops = 2 * gemm_n**3 / 1e9
    return Machine(gflops=flops / min(mm, onednn), bandwidth_gbs=big.numel() * 4 / stream / 1e9,
                   mm_gflops=flops / mm, onednn_gflops=flops / onednn)


def _seconds(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- the bench checkpoint -----------------------------------------------------------------------------
def bench_checkpoint(shape: BenchShape, root: Path, picture: tuple[int, int] | None = None) -> Path:
    """The checkpoint for ``shape`` under ``root`` (built once: seeded random weights, fp32, offline).
    ``picture``: (image size, patch size) of its vision tower and processor; None: the demo's (96 / 12, 64
    picture tokens). LLaVA-1.5's (336, 14) makes 576."""
    digest = hashlib.sha256(json.dumps(asdict(shape), sort_keys=True).encode()).hexdigest()[:8]
    seen = f"-{picture[0]}px" if picture else ""
    path = root / f"bench-model-{shape.hidden}x{shape.layers}{seen}-{digest}"
    if (path / "config.json").exists():
        return path
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from tuwen.workers.demo.build import IMAGE_SIZE, PATCH_SIZE, build_processor

    size, patch = picture or (IMAGE_SIZE, PATCH_SIZE)
    processor = build_processor(size, patch)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                              image_size=size, patch_size=patch, projection_dim=192)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,  # type: ignore[call-arg]
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(size // patch) ** 2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gen.do_sample = False
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{path.name}.{os.getpid()}"
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    try:
        partial.rename(path)
    except OSError:  # another run built it first
        shutil.rmtree(partial, ignore_errors=True)
    return path


def load(path: Path, max_new_tokens: int, cpu_linear: CpuLinear = CpuLinear.onednn) -> Runtime:
    rt = Runtime(Settings(model_path=path, torch_threads=1, max_new_tokens=max_new_tokens, dtype="float32",
                          cpu_linear=cpu_linear))
    rt.load()
    return rt


def decode_weights(model: Any) -> tuple[int, int]:
    """(parameters, bytes) a decode step reads and multiplies by: the language model's layers and its
    head; not the vision tower (it runs at prefill) nor the embedding table (one row is looked up)."""
    params = [p for name, p in model.named_parameters()
              if (".language_model." in f".{name}" or name.startswith("lm_head")) and "embed_tokens" not in name]
    head = model.get_output_embeddings().weight
    if not any(p is head for p in params):
        params.append(head)  # a tied head still reads its weights every step
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def roofline(machine: Machine, params: int, weight_bytes: int, batch: int) -> tuple[float, str]:
    """Decode tokens/s the machine allows at ``batch``, and which limit binds."""
    memory_s = weight_bytes / (machine.bandwidth_gbs * 1e9)
    compute_s = 2 * params * batch / (machine.gflops * 1e9)
    return batch / max(memory_s, compute_s), "bandwidth" if memory_s >= compute_s else "compute"


# -- measured decode --------------------------------------------------------------------------------
def _items(batch: int) -> list[Item]:
    return [Item(None, QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]


#: The constrained decode rows' schema: six string fields that cannot close within the timed steps.
SIX_FIELDS = {"type": "json_schema", "json_schema": {"name": "six", "schema": {
    "type": "object", "properties": {f"f{i}": {"type": "string", "minLength": 40} for i in range(6)},
    "required": [f"f{i}" for i in range(6)], "additionalProperties": False}}}


def engine_decode(rt: Runtime, batch: int, steps: int,
                  response_format: dict[str, Any] | None = None) -> tuple[float, bool, float]:
    """tuwen's engine: prefill ``batch`` rows (not timed), then time ``steps`` decode steps. Returns
    (tokens/s, every row produced its forced tokens, padding share of the attention columns; or, with a
    ``response_format`` constraining every row, the median seconds of one step's masks for all rows)."""
    group = rt.prepare(_items(batch))
    for row in group.rows:
        row.min_new_tokens = row.max_new_tokens = steps + 2
        row.grammar = rt.grammar(response_format)
    engine = rt.engine()
    engine.add(group.rows, group.enc)
    mask = engine._mask
    padding = 1 - float(mask.sum()) / mask.numel() if mask is not None else 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - t0
    if response_format is not None:
        padding = _mask_seconds(engine)
    running = engine.size
    done = engine.step()
    ok = running == batch and len(done) == batch and all(len(f.tokens) == steps + 2 and f.error is None
                                                        for f in done)
    return batch * steps / seconds, ok, padding


def _mask_seconds(engine: Any) -> float:
    """One step's grammar masks for every running row (fill and apply), median of 5, on fresh logits."""
    import torch

    logits = torch.randn(engine.size, engine.model.get_output_embeddings().weight.shape[0])
    times = []
    for _ in range(5):
        rows = {i: live.constraint for i, live in enumerate(engine.rows)}
        t0 = time.perf_counter()
        next(iter(rows.values())).mask_batch(logits, rows)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Clock:
    """A ``generate`` streamer that only notes when the first and the last token came."""

    def __init__(self) -> None:
        self.puts: list[float] = []

    def put(self, value: Any) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        self.puts.append(time.perf_counter())


def hf_decode(rt: Runtime, batch: int, steps: int) -> tuple[float, bool]:
    """Hugging Face ``generate`` on the same rows, ``steps + 1`` forced tokens; decode time is from the
    first generated token to the end (the streamer's first ``put`` is the prompt, its second the first
    token)."""
    processor, model = rt.processor, rt.model
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": item.question}]}],
                                             add_generation_prompt=True) for item in _items(batch)]
    enc = processor(text=prompts, return_tensors="pt", padding=True)
    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                             streamer=clock)
    seconds = clock.puts[-1] - clock.puts[1]
    ok = out.shape[1] - enc["input_ids"].shape[1] == steps + 1
    return batch * steps / seconds, ok


def skinny_linear(shapes: list[tuple[int, int]], rows: list[int],
                  repeats: int = 5) -> dict[tuple[str, int, int, int], float]:
    """GFLOPS of a linear layer with ``rows`` input rows against each (out, in) weight shape, on
    PyTorch's ``F.linear`` (``aten``) and on oneDNN with a packed weight (``onednn``); best of ``repeats``."""
    out: dict[tuple[str, int, int, int], float] = {}
    for n_out, n_in in shapes:
        plain = torch.nn.Linear(n_in, n_out, bias=False)
        layers = {"aten": plain, "onednn": packed.PackedLinear(plain) if packed.available() else plain}
        for r in rows:
            x = torch.randn(r, n_in)
            for kernel, layer in layers.items():
                with torch.inference_mode():
                    layer(x)
                    best = min(_seconds(lambda: layer(x)) for _ in range(repeats))  # noqa: B023 - used at once
                out[(kernel, n_out, n_in, r)] = 2 * r * n_in * n_out / best / 1e9
    return out


def _decode_linears(model: Any) -> list[Any]:
    return [m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, packed.PackedLinear))
            and ("language_model" in name or name.startswith("lm_head"))]


def weight_shapes(model: Any) -> list[tuple[int, int]]:
    """Distinct (out, in) shapes of the language model's linear layers, largest first."""
    return sorted({(m.out_features, m.in_features) for m in _decode_linears(model)}, key=lambda s: -s[0] * s[1])


def linear_seconds(model: Any, batch: int) -> float:
    """A decode step's linear layers timed alone at ``batch`` rows (the GEMM part of one step)."""
    total = 0.0
    with torch.inference_mode():
        for m in _decode_linears(model):
            x = torch.randn(batch, m.in_features)
            m(x)
            total += min(_seconds(lambda: m(x)) for _ in range(3))  # noqa: B023 - used at once
    return total


#: Profiler op names by what they are for, to summarise one decode step.
_KINDS = {"GEMM (linear)": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
          "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::softmax"),
          "cache and mask copies": ("aten::cat", "aten::copy_", "aten::index", "aten::slice", "aten::clone",
                                    "aten::contiguous", "aten::index_select")}


def profile_step(rt: Runtime, batch: int) -> tuple[float, list[tuple[str, float]], list[tuple[str, float]]]:
    """torch.profiler over two decode steps at ``batch``: (step ms, ms per kind, top 6 ops by self ms)."""
    from torch.profiler import ProfilerActivity, profile

    group = rt.prepare(_items(batch))
    for row in group.rows:
        row.min_new_tokens = row.max_new_tokens = 8
    engine = rt.engine()
    engine.add(group.rows, group.enc)
    engine.step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
        engine.step()
    step_ms = (time.perf_counter() - t0) * 1000 / 2
    ops = [(e.key, e.self_cpu_time_total / 1000 / 2) for e in prof.key_averages()]
    kinds: dict[str, float] = {k: 0.0 for k in _KINDS}
    other = 0.0
    for key, ms in ops:
        kind = next((k for k, names in _KINDS.items() if any(key.startswith(n) for n in names)), None)
        if kind is None:
            other += ms
        else:
            kinds[kind] += ms
    accounted = sum(kinds.values()) + other
    summary = [*kinds.items(), ("other torch ops", other),
               ("outside torch ops (Python, HF glue, profiler)", max(0.0, step_ms - accounted))]
    top = sorted(ops, key=lambda o: -o[1])[:6]
    return step_ms, summary, top


def explain(big: Runtime, batch: int) -> str:
    """Markdown: skinny GEMM at the bench model's weight shapes, and a profile of one decode step at ``batch``."""
    shapes = weight_shapes(big.model)
    rows = [1, 16, 64]
    gflops = skinny_linear(shapes, rows)
    lines = ["Skinny linear layers at the bench model's weight shapes, GFLOPS (best of 5), PyTorch's `F.linear` "
             "(aten: MKL) / oneDNN with a packed weight (what tuwen's CPU worker runs). At 1 row that is also "
             "GB/s of weights ÷ 2, cache-warm when one layer is timed alone, unlike in a decode step:",
             "", "| weight (out × in) | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    for n_out, n_in in shapes:
        cells = [f"{gflops[('aten', n_out, n_in, r)]:.0f} / {gflops[('onednn', n_out, n_in, r)]:.0f}" for r in rows]
        lines.append(f"| {n_out} × {n_in} | " + " | ".join(cells) + " |")
    step_ms, kinds, top = profile_step(big, batch)
    alone_ms = linear_seconds(big.model, batch) * 1000
    _, _, padding = engine_decode(big, batch, 1)
    lines += ["", f"One decode step at batch {batch} (torch.profiler, 2 steps): {step_ms:.0f} ms per step; its "
              f"linear layers timed alone at {batch} rows (cache-warm weights): {alone_ms:.0f} ms; padding {100 * padding:.0f}% of the "
              "attention columns.", "", "| part of a step | ms |", "|---|---:|"]
    lines += [f"| {kind} | {ms:.1f} |" for kind, ms in kinds]
    lines += ["", "Top ops by self time: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in top)]
    return "\n".join(lines)
