"""Train the demo model on freshly drawn worksheet pictures (CPU, bf16 autocast, seeded).

Loss = next-token loss on the answer + small auxiliary heads on the pooled image features that name
what is drawn (shape, colour, count, digits). The auxiliary heads give the from-scratch ViT a direct
signal early on (a real checkpoint would start from a pretrained CLIP); they are dropped on save, so
the saved directory is a plain ``LlavaForConditionalGeneration`` checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuwen.workers.demo.build import build_model, build_processor
from tuwen.workers.demo.build import PATCH_SIZE, IMAGE_SIZE
from tuwen.workers.demo.scenes import COLOURS, DENSE_CLASSES, SHAPES, Example, draw_training_example, patch_labels

#: Held-out seeds; training draws from ``seed`` and never from these.
EVAL_SEED = 777_001
WORKSHEET_SEED = 888_001
SAMPLES_SEED = 999_001

_HEADS = {"scene": 2, "shape": len(SHAPES), "colour": len(COLOURS), "count": 4, "a": 10, "op": 2, "b": 10}


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _batch(processor, examples: list[Example]) -> dict[str, torch.Tensor]:
    tok = processor.tokenizer
    prompts = [processor.apply_chat_template(_messages(e.question), add_generation_prompt=True) for e in examples]
    texts = [p + e.answer + tok.eos_token for p, e in zip(prompts, examples)]
    enc = processor(images=[e.image for e in examples], text=texts, return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], -100)
    lengths = enc["attention_mask"].sum(-1)
    for i, e in enumerate(examples):
        n = len(tok(e.answer + tok.eos_token, add_special_tokens=False)["input_ids"])
        end = int(lengths[i])
        labels[i, end - n:end] = enc["input_ids"][i, end - n:end]
    enc["labels"] = labels
    return enc


GRID = IMAGE_SIZE // PATCH_SIZE
#: Background patches are many and easy: they count for less in the dense loss.
_DENSE_WEIGHTS = torch.tensor([0.2] + [1.0] * (len(DENSE_CLASSES) - 1))


def _heads(dim: int) -> nn.ModuleDict:
    heads = {k: nn.Linear(2 * dim, n) for k, n in _HEADS.items()}
    heads["dense"] = nn.Linear(dim, len(DENSE_CLASSES))
    heads["centre"] = nn.Linear(dim, 2)
    return nn.ModuleDict(heads)


def _aux_loss(heads: nn.ModuleDict, feats: torch.Tensor, examples: list[Example]) -> tuple[torch.Tensor, float]:
    """Pooled heads name what is drawn; dense heads say, per patch, what covers it and where objects'
    centres are (digits by position, objects to count). Returns the loss and the dense accuracy on
    non-background patches."""
    feats = feats.float()
    pooled = torch.cat([feats.mean(1), feats.amax(1)], dim=-1)
    total = feats.new_zeros(())
    for name in _HEADS:
        rows = [i for i, e in enumerate(examples) if name in e.labels]
        if rows:
            target = torch.tensor([examples[i].labels[name] for i in rows])
            total = total + nn.functional.cross_entropy(heads[name](pooled[rows]), target)
    dense = [patch_labels(e, GRID) for e in examples]
    cls = torch.tensor([c for c, _ in dense])
    centre = torch.tensor([m for _, m in dense])
    logits = heads["dense"](feats)
    total = total + nn.functional.cross_entropy(logits.flatten(0, 1), cls.flatten(), weight=_DENSE_WEIGHTS)
    total = total + nn.functional.cross_entropy(heads["centre"](feats).flatten(0, 1), centre.flatten(),
                                                weight=torch.tensor([0.2, 1.0]))
    fg = cls > 0
    acc = float((logits.argmax(-1)[fg] == cls[fg]).float().mean()) if fg.any() else 0.0
    return total, acc


#: How often each question type is drawn. Reading digits and counting are the slow skills for a ViT
#: learnt from scratch, so they are drawn more often than colour and shape.
KIND_WEIGHTS = {"shape": 0.12, "colour": 0.08, "count": 0.25, "arithmetic": 0.4, "describe": 0.15}


def draw_batch(rng: random.Random, n: int, uniform: bool = False) -> list[Example]:
    if uniform:
        return [draw_training_example(rng) for _ in range(n)]
    kinds = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=n)
    return [draw_training_example(rng, kind) for kind in kinds]


def _optimise(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, params: list[nn.Parameter]) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def pretrain_vision(model, processor, heads: nn.ModuleDict, rng: random.Random, *, steps: int, batch_size: int,
                    lr: float, log: Callable[[str], None], uniform: bool = False) -> None:
    """Stage 1: the vision encoder alone learns to see shapes, colours, digits and object centres
    (about 4× cheaper per picture than the full model; the bottleneck of learning from scratch)."""
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    layer = model.config.vision_feature_layer
    t0 = time.time()
    for step in range(1, steps + 1):
        examples = draw_batch(rng, batch_size, uniform)
        pixels = processor.image_processor([e.image for e in examples], return_tensors="pt")["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        loss, acc = _aux_loss(heads, feats, examples)
        _optimise(loss, opt, sched, params)
        if step % 25 == 0:
            log(f"vision step {step}/{steps} aux {loss.item():.4f} dense-acc {acc:.3f} {time.time() - t0:.0f}s")


def train(
    out_dir: Path,
    *,
    steps: int = 3000,
    vision_steps: int = 0,
    init_from: Path | None = None,
    stop_after: int | None = None,
    uniform_kinds: bool = False,
    batch_size: int = 48,
    lr: float = 1.5e-3,
    seed: int = 1234,
    threads: int = 2,
    eval_every: int = 250,
    log: Callable[[str], None] = print,
) -> Path:
    """Train from scratch and save a ``save_pretrained`` checkpoint to ``out_dir``; returns it."""
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    if init_from is not None:  # continue from a saved checkpoint (fresh optimizer and auxiliary heads)
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        processor = LlavaProcessor.from_pretrained(init_from)
        model = LlavaForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
    else:
        processor = build_processor()
        model = build_model(processor, seed=seed)
    processor.tokenizer.padding_side = "right"
    feat_dim = model.config.vision_config.hidden_size
    heads = _heads(feat_dim)
    if vision_steps:
        pretrain_vision(model, processor, heads, rng, steps=vision_steps, batch_size=64, lr=2e-3, log=log,
                        uniform=uniform_kinds)
    captured: dict[str, torch.Tensor] = {}
    model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, args: captured.__setitem__("f", args[0]))

    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    history = []
    t0 = time.time()
    for step in range(1, (stop_after or steps) + 1):
        model.train()
        examples = draw_batch(rng, batch_size, uniform_kinds)
        batch = _batch(processor, examples)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
            aux, dense_acc = _aux_loss(heads, captured["f"], examples)
        _optimise(out.loss.float() + 0.5 * aux, opt, sched, params)
        if step % 25 == 0:
            log(f"step {step}/{steps} lm {out.loss.item():.4f} aux {aux.item():.4f} "
                f"dense-acc {dense_acc:.3f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
        if step % eval_every == 0 or step == (stop_after or steps):
            save(model, processor, out_dir)
            acc = quick_accuracy(out_dir, per_kind=20)
            history.append({"step": step, "seconds": round(time.time() - t0), **acc})
            log(f"eval step {step}: " + json.dumps(acc, ensure_ascii=False))
            (out_dir / "training_log.json").write_text(json.dumps(history, ensure_ascii=False, indent=1))
    return out_dir


def save(model, processor, out_dir: Path) -> None:
    """Save weights in bfloat16 (half the size; the runtime loads them in float32 on CPU)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.padding_side = "left"
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.to(torch.float32)
    processor.save_pretrained(out_dir)
    processor.tokenizer.padding_side = "right"


def quick_accuracy(checkpoint: Path, per_kind: int) -> dict[str, float]:
    """Key-fact accuracy on a small held-out set, through the same loading path as production."""
    from tuwen.workers.demo.evaluate import evaluate

    table = evaluate(checkpoint, per_kind=per_kind, styles=("training",), threads=torch.get_num_threads())
    return {k: round(v, 3) for k, v in table["training"].items()}


def main() -> None:  # pragma: no cover - manual entry point for background runs
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--vision-steps", type=int, default=0)
    ap.add_argument("--init-from", type=Path, default=None)
    ap.add_argument("--stop-after", type=int, default=None, help="stop early (the schedule still spans --steps)")
    ap.add_argument("--uniform-kinds", action="store_true", help="draw question types uniformly")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    a = ap.parse_args()
    train(a.out, steps=a.steps, vision_steps=a.vision_steps, init_from=a.init_from, stop_after=a.stop_after,
          uniform_kinds=a.uniform_kinds, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
          eval_every=a.eval_every, log=lambda s: print(s, flush=True))


if __name__ == "__main__":  # pragma: no cover
    main()
