"""Train the demo speech model on synthetic Mandarin (CPU, one thread, bf16 autocast, seeded).

``python -m tuwen.workers.demo.speech.train --out DIR`` builds a fresh tiny Whisper (``build.py``) and
trains it on the corpus's training sentences (``corpus.py``) as espeak-ng says them under ``synth.TRAIN``
conditions. espeak-ng is the slow part of a clip, so dry clips are kept in a pool that is partly redrawn
every step; the room, noise, gain and silence around each clip are drawn fresh every time it is used.
Clip seeds come from ``seed``; the evaluation's seeds (``evaluate.SEEDS``) are far from them. The saved
directory is a plain ``save_pretrained`` Whisper checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tuwen.workers.demo.speech import corpus, synth
from tuwen.workers.demo.speech.build import build_model, build_processor, generation_config

#: How often each kind of sentence is drawn; "silence" is noise or a room with nothing said (target: "").
MIX = {"demo": 0.45, "sums": 0.3, "counts": 0.14, "numbers": 0.07, "silence": 0.04}


def training_sentences() -> dict[str, list[str]]:
    train = set(corpus.sentences("train"))
    return {
        "demo": corpus.demo_questions(),
        "sums": [s for s in corpus.sums() if s in train],
        "counts": [s for s in corpus.counts() if s in train],
        "numbers": corpus.numbers(),
    }


class ClipPool:
    """Dry espeak-ng clips (text, voice, samples at 16 kHz), ``refresh`` of them redrawn per step."""

    def __init__(self, rng: random.Random, size: int, conditions: synth.Conditions) -> None:
        self.rng, self.conditions = rng, conditions
        self.sentences = training_sentences()
        self.clips = [self._draw() for _ in range(size)]

    def _draw(self) -> tuple[str, synth.Voice, np.ndarray]:
        kind = self.rng.choices([k for k in MIX if k != "silence"], [MIX[k] for k in MIX if k != "silence"])[0]
        text = self.rng.choice(self.sentences[kind])
        voice = synth.Voice.draw(self.rng, self.conditions)
        dry, rate = synth.espeak(text, voice)
        return text, voice, synth.resample(dry, rate, synth.SAMPLE_RATE)

    def refresh(self, n: int) -> None:
        for _ in range(n):
            self.clips[self.rng.randrange(len(self.clips))] = self._draw()

    def sample(self, n: int) -> list[tuple[str, np.ndarray]]:
        """``n`` finished clips: pool clips with fresh room, noise, gain and padding, and some silences."""
        out = []
        for _ in range(n):
            seed = self.rng.getrandbits(32)
            fresh = synth.Voice.draw(random.Random(seed), self.conditions)
            if self.rng.random() < MIX["silence"]:
                voice = replace(fresh, snr_db=fresh.snr_db if fresh.snr_db is not None else 20.0)
                length = int(self.rng.uniform(0.3, 6.0) * synth.SAMPLE_RATE)
                out.append(("", silence(length, voice, seed)))
                continue
            text, voice, dry = self.rng.choice(self.clips)
            voice = replace(voice, snr_db=fresh.snr_db, noise_colour=fresh.noise_colour, rt60=fresh.rt60,
                            gain=fresh.gain, pad_before=fresh.pad_before, pad_after=fresh.pad_after)
            out.append((text, synth.finish(dry, voice, seed)))
        return out


def silence(length: int, voice: synth.Voice, seed: int) -> np.ndarray:
    """Noise alone (at the level it would have beside speech), sometimes with a faint hum."""
    rng = np.random.default_rng(seed)
    level = 0.7 * 0.3 / math.sqrt(10 ** ((voice.snr_db or 20.0) / 10))
    audio = synth.noise(length, voice.noise_colour, rng) * level
    if rng.random() < 0.3:
        audio += 0.02 * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * np.arange(length) / synth.SAMPLE_RATE)
    return np.clip(audio * voice.gain, -1, 1).astype(np.float32)


def batch(processor, clips: list[tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Features and labels. Labels are the tokenizer's ``<|zh|><|transcribe|><|notimestamps|>text<|endoftext|>``
    (its leading ``<|startoftranscript|>`` dropped: the model puts the decoder start in front itself)."""
    features = processor.feature_extractor([a for _, a in clips], sampling_rate=synth.SAMPLE_RATE,
                                           return_tensors="pt").input_features
    tok = processor.tokenizer
    rows = [tok(text).input_ids[1:] for text, _ in clips]
    width = max(len(r) for r in rows)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, : len(r)] = torch.tensor(r)
    return {"input_features": features, "labels": labels}


def ctc_loss(head: torch.nn.Linear, encoded: torch.Tensor, labels: torch.Tensor, prefix: int) -> torch.Tensor:
    """Connectionist temporal classification of the encoder's output against the text tokens (the labels less
    their language/task prefix and ``<|endoftext|>``). An auxiliary loss: it makes the encoder line up with
    the characters early, which an attention decoder trained from scratch is slow to find on its own."""
    logp = head(encoded.float()).log_softmax(-1).transpose(0, 1)  # (time, batch, vocab + blank)
    rows = [r[prefix:][r[prefix:] >= 0][:-1] for r in labels]  # text tokens: no prefix, no padding, no EOT
    targets = torch.cat(rows) if rows else labels.new_zeros(0)
    lengths = torch.tensor([len(r) for r in rows])
    frames = torch.full((labels.shape[0],), encoded.shape[1], dtype=torch.long)
    return torch.nn.functional.ctc_loss(logp, targets, frames, lengths, blank=head.out_features - 1,
                                        zero_infinity=True)


def train(
    out_dir: Path,
    *,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1.5e-3,
    seed: int = 1234,
    pool_size: int = 1200,
    refresh: int = 4,
    threads: int = 1,
    eval_every: int = 200,
    eval_clips: int = 24,
    ctc_weight: float = 0.3,
    minutes: float | None = 28.0,
    init_from: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train from scratch and save a ``save_pretrained`` checkpoint to ``out_dir``; returns it.

    With ``minutes``, the learning-rate schedule runs on whichever is further along, steps or wall time, and
    training stops when either is spent: the run ends on time however busy the machine is (then the step
    count it reached is in ``training_log.json``, and the run is reproducible only up to that)."""
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    if init_from is not None:  # continue from a saved checkpoint (fresh optimizer and CTC head)
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        processor = WhisperProcessor.from_pretrained(init_from)
        model = WhisperForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
        model.generation_config = generation_config(processor.tokenizer)
    else:
        processor = build_processor()
        model = build_model(processor, seed=seed)
    t0 = time.time()
    pool = ClipPool(rng, pool_size, synth.TRAIN)
    log(f"pool of {pool_size} clips drawn in {time.time() - t0:.0f}s")
    head = torch.nn.Linear(model.config.d_model, model.config.vocab_size + 1)  # + the CTC blank; not saved
    params = list(model.parameters()) + (list(head.parameters()) if ctc_weight else [])
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))
    t0 = time.time()

    def progress(step: int) -> float:
        spent = (time.time() - t0) / (60 * minutes) if minutes else 0.0
        return min(1.0, max(step / steps, spent))

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress(s))))
    )
    history: list[dict[str, float]] = []
    step = 0
    while progress(step) < 1.0:
        step += 1
        model.train()
        pool.refresh(refresh)
        inputs = batch(processor, pool.sample(batch_size))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
        loss = out.loss.float()
        if ctc_weight:
            loss = loss + ctc_weight * ctc_loss(head, out.encoder_last_hidden_state, inputs["labels"], prefix=3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            log(f"step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
        last = progress(step) >= 1.0
        if step % eval_every == 0 or last:
            save(model, processor, out_dir)
            score = quick_cer(out_dir, eval_clips)
            history.append({"step": step, "seconds": round(time.time() - t0), **score})
            log(f"eval step {step}: " + json.dumps(score))
            (out_dir / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")
    return out_dir


def save(model, processor, out_dir: Path) -> None:
    """Weights in bfloat16 (half the size); ``config.dtype`` says float32, so ``from_pretrained``'s default
    ("auto") loads them as float32, as the runtime computes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.to(torch.float32)
    config = json.loads((out_dir / "config.json").read_text())
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out_dir)


def quick_cer(checkpoint: Path, clips: int) -> dict[str, float]:
    """CER on a small dev set (held-out conditions, dev seeds), through the generic loading path."""
    from tuwen.workers.demo.speech.evaluate import evaluate

    table = evaluate(checkpoint, per_row=clips, split="dev", rows=("questions", "sums and counts"))
    return {f"{row} cer": round(v["cer"], 4) for row, v in table.items()}


def main() -> None:  # pragma: no cover - manual entry point for background runs
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--pool-size", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--ctc-weight", type=float, default=0.3, help="weight of the auxiliary CTC loss")
    ap.add_argument("--minutes", type=float, default=28.0, help="wall-time budget (the schedule follows it)")
    ap.add_argument("--init-from", type=Path, default=None, help="continue from this checkpoint")
    a = ap.parse_args()
    train(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, pool_size=a.pool_size,
          threads=a.threads, eval_every=a.eval_every, ctc_weight=a.ctc_weight, minutes=a.minutes,
          init_from=a.init_from, log=lambda s: print(s, flush=True))


if __name__ == "__main__":  # pragma: no cover
    main()
