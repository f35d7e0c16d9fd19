"""The speech stage measured (issue 28): a private Redis, local storage, one speech worker and one picture worker
on this machine's CPU.

1. Batched transcription against one at a time: the same clips through ``SpeechRuntime.transcribe`` as one batch
   and one by one (the transcripts must be the same), the speed-up and the real-time factor (model time over audio).
2. Idle latency of a spoken question: ``--asks`` questions one after another (picture + WAV, nothing else queued),
   each job's total, the speech stage's part and the picture stage's part; p50 and p90.

    .venv/bin/python scripts/speech_stage.py --speech CHECKPOINT [--clips 8] [--asks 20] [--runs 3]

The clips are the demo speech model's own synthetic Mandarin (espeak-ng) of the samples' questions, from its
synthesiser.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.engine.speech import SpeechRuntime


def clip(text: str, seed: int) -> tuple[np.ndarray, int]:
    """``text`` spoken by the demo's synthesiser (16 kHz float32)."""
    from tuwen.workers.demo.speech.synth import speak

    audio, rate = speak(text, seed=seed)
    return np.asarray(audio, np.float32), int(rate)


def wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def batching(speech: Path, clips: list[np.ndarray], runs: int) -> None:
    runtime = SpeechRuntime(Settings(speech_model_path=speech, torch_threads=1))
    runtime.load()
    runtime.transcribe(clips[:1])  # warm
    seconds = sum(len(c) for c in clips) / runtime.rate
    for run in range(runs):
        t0 = time.perf_counter()
        together = runtime.transcribe(clips)
        t_batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = [runtime.transcribe([c])[0] for c in clips]
        t_alone = time.perf_counter() - t0
        print(f"run {run + 1}: {len(clips)} clips, {seconds:.1f} s of audio: batched {t_batch:.2f} s (RTF "
              f"{t_batch / seconds:.3f}), one at a time {t_alone:.2f} s (RTF {t_alone / seconds:.3f}), "
              f"speed-up {t_alone / t_batch:.2f}x, same transcripts: {together == alone}")


def latency(speech: Path, asks: list[tuple[Path, bytes]], tmp: Path) -> None:
    with LocalRedis() as redis:
        settings = Settings(redis_url=redis.url, storage_dir=tmp / "storage", speech_model_path=speech,
                            model_path=bundled_demo_model(), answer_cache=False, batch_wait_ms=0)
        workers = [WorkerProcess(settings, "speech@bench", tmp / "speech.log", role="speech"),
                   WorkerProcess(settings, "picture@bench", tmp / "picture.log")]
        for w in workers:
            w.start()
        try:
            for w in workers:
                w.wait_ready(180)
            client = Client(settings)
            total, speech_part, picture_part = [], [], []
            for i, (picture, audio) in enumerate([asks[0], *asks]):  # the first one warms, not counted
                result = client.wait(client.submit(picture, audio=audio).id, timeout=120)
                assert result.status.value == "succeeded", result.error
                if i:
                    stages = {s.name.value: s for s in result.stages or []}
                    total.append(result.timings["total_ms"])
                    speech_part.append(stages["speech"].timings["speech_queue_ms"] + stages["speech"].timings["speech_ms"])
                    picture_part.append(stages["picture"].timings["picture_ms"])
            share = statistics.median(s / t for s, t in zip(speech_part, total))
            print(f"{len(total)} spoken questions one at a time: total p50 {pct(total, .5):.0f} ms, p90 "
                  f"{pct(total, .9):.0f} ms; speech stage p50 {pct(speech_part, .5):.0f} ms, picture stage p50 "
                  f"{pct(picture_part, .5):.0f} ms; the speech stage's share (median) {share:.0%}")
            client.close()
        finally:
            for w in workers:
                w.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--speech", type=Path, required=True, help="a Whisper-family checkpoint directory")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--asks", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    samples = load_samples()
    spoken = [clip(samples[i % len(samples)].question, seed=i) for i in range(max(args.clips, args.asks))]
    batching(args.speech, [c for c, _ in spoken[:args.clips]], args.runs)
    with tempfile.TemporaryDirectory(prefix="tuwen-speech-") as tmp:
        latency(args.speech, [(samples[i % len(samples)].path, wav(*spoken[i])) for i in range(args.asks)], Path(tmp))


if __name__ == "__main__":
    main()
