"""``tuwen demo``: a whole pipeline on one machine, from nothing, and gone again afterwards.

Starts a private redis-server on a free port (never the one on 6379), local-directory storage, one
worker with the demo model and one speech worker with the demo speech model; submits the bundled pictures
through the queue, the first ``SPOKEN`` questions asked aloud (Mandarin synthesised by espeak-ng at a rate
and noise level the speech model never trained on); prints each question with its answer and timing;
stops what it started.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.demo.speech import bundled_speech_model
from tuwen.workers.bench.process import WorkerProcess

#: How many of the demo's questions are asked aloud.
SPOKEN = 2


def spoken(question: str, seed: int) -> bytes:
    """``question`` said in Mandarin, as WAV bytes, by a voice and at a rate and noise level held out from the
    speech model's training."""
    import random

    from tuwen.workers.demo.speech import synth

    voice = synth.Voice.draw(random.Random(seed), synth.HELD_OUT)
    return synth.wav_bytes(synth.speak(question, seed=seed, voice=voice)[0])


def run_demo(console: Console, *, model_path: Path | None = None) -> int:
    samples = load_samples()
    with LocalRedis() as redis_server, tempfile.TemporaryDirectory(prefix="tuwen-demo-") as tmp:
        settings = Settings(redis_url=redis_server.url, storage_dir=Path(tmp) / "storage", model_path=model_path,
                            speech_model_path=bundled_speech_model(), minio_endpoint=None, max_batch_size=8,
                            batch_wait_ms=200, max_new_tokens=48)
        console.print(f"[dim]redis-server on {redis_server.url}; storage in {settings.storage_dir}[/dim]")
        worker = WorkerProcess(settings, "demo@localhost", Path(tmp) / "worker.log", threads=2).start()
        ears = WorkerProcess(settings, "speech@localhost", Path(tmp) / "speech.log", threads=1, role="speech").start()
        client = Client(settings)
        try:
            t0 = time.monotonic()
            worker.wait_ready(timeout=300)
            ears.wait_ready(timeout=300)
            console.print(f"[dim]workers ready in {time.monotonic() - t0:.1f}s[/dim]")
            t0 = time.monotonic()
            jobs = [client.submit(s.path.read_bytes(), audio=spoken(s.question, 7_700_000 + n)) if n < SPOKEN
                    else client.submit(s.path.read_bytes(), s.question) for n, s in enumerate(samples)]
            results = client.wait_many([j.id for j in jobs], timeout=300)
            elapsed = time.monotonic() - t0
        finally:
            client.close()
            ears.stop()
            worker.stop()
        console.print("[bold]tuwen demo — questions and answers through the queue[/bold]\n")
        right = 0
        for n, (sample, job) in enumerate(zip(samples, jobs), 1):
            res = results[job.id]
            ok = res.answer is not None and all(f in res.answer for f in sample.facts)
            right += ok
            mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
            console.print(f"[dim]{n:>2}. {sample.path.name} · batch of {res.batch_size or '-'} · "
                          f"{res.timings.get('total_ms', 0):.0f} ms[/dim]")
            if n <= SPOKEN:
                console.print(f"    问（语音）：{sample.question}\n    听到：{res.transcript or '—'}")
            else:
                console.print(f"    问：{sample.question}")
            if res.answer is not None:
                console.print(f"    答：{res.answer} {mark}")
            else:
                console.print(f"    [red]{res.status.value}: {res.error.code if res.error else '?'}[/red]")
        console.print(f"{right}/{len(samples)} answers name the right facts; {len(samples)} jobs in {elapsed:.1f}s.")
        return 0 if all(results[j.id].status.value == "succeeded" for j in jobs) else 1
