"""GPU smoke test: a LLaVA-1.5-architecture model of realistic size through tuwen's runtime.

Builds a random-weight LLaVA (CLIP ViT-L/14-336 + a ~1.3B Llama, ~1.7B parameters) with a
character-level tokenizer made offline, saves it, then for bf16, int8 and nf4 loads it through
``tuwen.workers.engine.model.Runtime`` and answers batches of 1, 8 and 32 questions. Prints a Markdown table:
tokens/s, answers/s, peak GPU memory, load seconds. Random weights answer gibberish; this measures
speed and memory, not quality. Runs in about 2-4 minutes on one H200 (the budget is 8).

    python scripts/gpu_smoke.py                       # CUDA, realistic size
    python scripts/gpu_smoke.py --device cpu --tiny   # the same path on CPU in seconds (also: --dry-run)
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = ["图中是什么形状？", "这是什么颜色？", "数一数，图中一共有几个图形？", "描述这张图片。",
             "算一算，结果是多少？", "请你仔细看图，说一说图形涂的是什么颜色。", "图中有什么？",
             "这道口算题的答案是几？"]


@dataclass(frozen=True)
class Shape:
    """Sizes of the vision tower and language model to build."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int


#: LLaVA-1.5's vision tower (CLIP ViT-L/14 at 336 px: 576 image tokens) with a ~1.3B Llama.
REALISTIC = Shape(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                  hidden=2048, layers=24, heads=16, intermediate=5632, vocab_size=32000)
#: Small enough for a CPU in seconds; dimensions stay >= 64 for bitsandbytes' 4-bit blocks.
TINY = Shape(image_size=56, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=4,
             hidden=64, layers=2, heads=4, intermediate=128, vocab_size=1000)


def build_tokenizer(vocab_size: int) -> Any:
    """The demo's character tokenizer, filled up with CJK characters to ``vocab_size`` entries."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from tuwen.workers.demo.build import vocabulary

    tokens = vocabulary()
    seen = set(tokens)
    code = 0x4E00
    while len(tokens) < vocab_size:
        if chr(code) not in seen:
            tokens.append(chr(code))
        code += 1
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>",
                                fuse_unk=False))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                  padding_side="left", model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def build_checkpoint(shape: Shape, path: Path, device: str) -> int:
    """Build, randomly initialise (on ``device``, fast) and save in bf16; returns the parameter count."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from tuwen.workers.demo.build import CHAT_TEMPLATE

    tok = build_tokenizer(shape.vocab_size)
    side = shape.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                           do_center_crop=True, do_convert_rgb=True),
        tokenizer=tok, patch_size=shape.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=side, patch_size=shape.patch_size, projection_dim=768)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(side // shape.patch_size) ** 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.to(torch.bfloat16)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gen.do_sample = False
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    processor.save_pretrained(path)
    del model
    return params


def pictures(n: int, seed: int = 0) -> list[Any]:
    """Random-noise pictures of different sizes and aspect ratios."""
    from PIL import Image

    rng = random.Random(seed)
    sizes = [(rng.randrange(200, 1200), rng.randrange(200, 1200)) for _ in range(n)]
    return [Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)) for w, h in sizes]


def run_mode(path: Path, mode: str, device: str, batches: list[int], max_new_tokens: int,
             threads: int) -> list[dict[str, Any]]:
    """Load the checkpoint in one mode and time ``answer_batch`` for each batch size."""
    import torch

    from tuwen.pipeline.settings import DType, Quantization, Settings
    from tuwen.workers.engine.model import Item, Runtime

    cuda = device.startswith("cuda")
    dtype = DType.bfloat16 if cuda else DType.float32
    quant = {"bf16": Quantization.none, "fp32": Quantization.none, "int8": Quantization.int8,
             "nf4": Quantization.nf4}[mode]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rt = Runtime(Settings(model_path=path, device=device, dtype=dtype, quantization=quant,
                          max_new_tokens=max_new_tokens, torch_threads=threads))
    rt.load()
    images = pictures(max(batches))
    rt.answer_batch([Item(images[0], QUESTIONS[0], 2)])  # warm-up: kernels, allocator
    rows = []
    for size in batches:
        items = [Item(images[i], QUESTIONS[i % len(QUESTIONS)]) for i in range(size)]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        answers = rt.answer_batch(items)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        failed = [a.error for a in answers if not a.ok]
        if failed:
            raise RuntimeError(f"{mode} batch {size}: {failed[0]}")
        generated = sum(a.generated_tokens for a in answers)
        rows.append(dict(mode=mode, batch=size, seconds=wall, tokens=generated, tokens_s=generated / wall,
                         answers_s=size / wall, prompt=answers[0].prompt_tokens,
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                         load_s=rt.load_seconds or 0.0))
        print(f"  {mode} batch {size}: {wall:.2f}s, {generated} tokens", file=sys.stderr, flush=True)
    del rt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | batch | new tokens | tokens/s | answers/s | peak GPU memory | load s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {r['mode']} | {r['batch']} | {r['tokens']} | {r['tokens_s']:.1f} | {r['answers_s']:.2f} "
                     f"| {peak} | {r['load_s']:.1f} |")
    return "\n".join(lines)


def _count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the ~1.7B one")
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny")
    parser.add_argument("--modes", default=None, help="comma list of bf16/fp32,int8,nf4 (default: all three)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="where to save the checkpoint (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")  # int8 on CPU: one cast warning per matmul
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny (or --dry-run) to exercise the script here", file=sys.stderr)
        return 2
    threads = 0 if cuda else 1
    if not cuda:
        torch.set_num_threads(1)
    shape = TINY if args.tiny else REALISTIC
    modes = (args.modes or ("bf16,int8,nf4" if cuda else "fp32,int8,nf4")).split(",")
    batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuwen-gpu-smoke-"))
    try:
        t0 = time.perf_counter()
        params = build_checkpoint(shape, workdir, args.device)
        build_s = time.perf_counter() - t0
        print(f"built {_count(params)} parameters in {build_s:.1f}s at {workdir}", file=sys.stderr, flush=True)
        rows: list[dict[str, Any]] = []
        for mode in modes:
            rows += run_mode(workdir, mode, args.device, batches, args.max_new_tokens, threads)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    import bitsandbytes

    where = torch.cuda.get_device_name(args.device) if cuda else "CPU, 1 thread"
    prompt = rows[0]["prompt"] if rows else 0
    head = (f"LLaVA-1.5 architecture, random weights, {_count(params)} parameters, {where}; "
            f"{args.max_new_tokens} new tokens per answer (greedy), prompt ≈ {prompt} tokens; torch "
            f"{torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}; "
            f"total {time.perf_counter() - started:.0f}s")
    text = f"{head}\n\n{table(rows)}\n"
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
