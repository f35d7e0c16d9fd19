"""The whole ``tuwen`` command: the producer commands of ``tuwen.pipeline.cli`` plus the model-side ones
(worker, demo, train-demo, eval-demo, bench).

Composed here, at the top layer, so that ``pipeline`` never imports ``workers``. Nothing here imports
torch at import time: a producer-only install (``pip install tuwen``) still runs every producer command,
and a model-side command says which extra to install.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tuwen.pipeline.cli import app, console, err, settings_from
from tuwen.pipeline.settings import Quantization


def _need_worker_extra() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        err.print(f"this command needs the model side: pip install 'tuwen[worker]' ({exc.name} is missing)",
                  markup=False)
        raise typer.Exit(2) from exc


class Role(str, Enum):
    """What a worker process does: answer questions about pictures, or transcribe spoken questions."""

    picture = "picture"
    speech = "speech"


@app.command()
def worker(
    role: Annotated[Role, typer.Option(help="picture: answer on the interactive and bulk queues; speech: "
                                            "transcribe spoken questions on TUWEN_SPEECH_QUEUE")] = Role.picture,
    model_path: Annotated[Optional[Path], typer.Option(help="checkpoint directory [TUWEN_MODEL_PATH, or "
                                                            "TUWEN_SPEECH_MODEL_PATH for --role speech]")] = None,
    quantization: Annotated[Optional[Quantization], typer.Option(help="[TUWEN_QUANTIZATION]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N [TUWEN_DEVICE]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="[TUWEN_MAX_BATCH_SIZE]")] = None,
    wait_ms: Annotated[Optional[int], typer.Option(help="[TUWEN_BATCH_WAIT_MS]")] = None,
    queues: Annotated[Optional[str], typer.Option(help="comma-separated, default: interactive,bulk")] = None,
    hostname: Annotated[Optional[str], typer.Option(help="worker name, e.g. gpu0@host")] = None,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run a GPU (or CPU) worker: load the model once and answer batches from the queues."""
    _need_worker_extra()
    if role == Role.speech:
        from tuwen.workers.serve.speech import run_speech_worker

        speech = settings_from(speech_model_path=model_path, device=device, speech_batch_size=batch_size,
                               batch_wait_ms=wait_ms)
        if speech.speech_model_path is None:  # none given: the bundled demo speech model, once it is trained
            from tuwen.workers.demo.speech import bundled_speech_model

            if (bundled_speech_model() / "config.json").exists():
                speech = speech.model_copy(update={"speech_model_path": bundled_speech_model()})
        if speech.speech_model_path is None:
            err.print("a speech worker needs a Whisper-family checkpoint: --model-path or TUWEN_SPEECH_MODEL_PATH",
                      markup=False)
            raise typer.Exit(2)
        run_speech_worker(speech, hostname=hostname, loglevel=loglevel)
        return
    from tuwen.workers.serve.hooks import Hooks
    from tuwen.workers.serve.main import run_worker

    from tuwen.workers.demo import bundled_demo_model

    settings = settings_from(model_path=model_path, quantization=quantization, device=device,
                             max_batch_size=batch_size, batch_wait_ms=wait_ms)
    if settings.model_path is None:  # no checkpoint given: the bundled demo model
        settings = settings.model_copy(update={"model_path": bundled_demo_model()})
    run_worker(settings, queues=queues.split(",") if queues else None, hostname=hostname, loglevel=loglevel,
               hooks=Hooks())


@app.command()
def demo(
    model_path: Annotated[Optional[Path], typer.Option(help="checkpoint (default: the bundled demo model)")] = None,
) -> None:
    """Start a private Redis, storage and a worker; ask the bundled pictures; print the answers."""
    _need_worker_extra()
    from tuwen.workers.demo.run import run_demo

    raise typer.Exit(run_demo(console, model_path=model_path))


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option("--model", help="checkpoint directory (default: the bundled demo "
                                                                  "model) [TUWEN_MODEL_PATH]")] = None,
    host: Annotated[Optional[str], typer.Option(help="[TUWEN_GATEWAY_HOST] (default 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="[TUWEN_GATEWAY_PORT] (default 8000)")] = None,
    threads: Annotated[int, typer.Option(help="the worker's torch threads")] = min(4, os.cpu_count() or 1),
) -> None:
    """Run everything on this machine until Ctrl-C: a private Redis (or TUWEN_REDIS_URL), storage in the
    per-user data directory, a worker and the gateway. Prints the URL, the playground and an API key."""
    _need_worker_extra()
    from tuwen.pipeline.gateway.settings import GatewaySettings
    from tuwen.workers.demo.serve import run_serve

    settings = settings_from(model_path=model)
    gw = GatewaySettings()
    raise typer.Exit(run_serve(console, settings, redis_given="redis_url" in settings.model_fields_set,
                               host=host or gw.gateway_host, port=port or gw.gateway_port, threads=threads))


@app.command("train-demo")
def train_demo(
    out: Annotated[Path, typer.Option(help="output checkpoint directory")] = Path("runs/demo"),
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """Train the tiny demo model from scratch on freshly drawn worksheets (CPU, about an hour), seeded.

    The recipe that made the bundled checkpoint: phase A — vision encoder alone (600 steps), then the
    whole model (1000 of a 2000-step schedule), question types drawn uniformly; phase B — from A, the
    vision encoder again (300 steps), then the whole model (1500 steps), digits and counts drawn more
    often.
    """
    _need_worker_extra()
    from tuwen.workers.demo.train import train

    def log(line: str) -> None:
        console.print(line, markup=False)

    phase_a = out.with_name(out.name + "-phase-a")
    train(phase_a, vision_steps=600, steps=2000, stop_after=1000, uniform_kinds=True, seed=1234, lr=1.5e-3,
          threads=threads, log=log)
    train(out, init_from=phase_a, vision_steps=300, steps=1500, seed=4321, lr=1e-3, threads=threads, log=log)
    console.print(f"saved to {out}", markup=False)


@app.command("eval-demo")
def eval_demo(
    checkpoint: Annotated[Optional[Path], typer.Option(help="default: the bundled demo model")] = None,
    per_kind: Annotated[int, typer.Option(help="held-out pictures per question type and style")] = 200,
    threads: Annotated[int, typer.Option()] = 1,
) -> None:
    """Print the demo model's key-fact accuracy per question type (the README's table)."""
    _need_worker_extra()
    from tuwen.workers.demo.evaluate import main as evaluate

    console.print(evaluate(checkpoint, per_kind, threads), markup=False)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="small sizes: every row in about a minute (the smoke test)")] = False,
    inputs: Annotated[Optional[int], typer.Option(help="(image, question) inputs, the same for every row")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option()] = None,
    transport_jobs: Annotated[Optional[int], typer.Option(help="jobs for the null-model transport row")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="interleaved repeats per row (the median is shown)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="the workers' max_batch_size (also a decode row)")] = None,
    model_path: Annotated[Optional[Path], typer.Option(help="the model for rows a-h (default: the demo)")] = None,
    cache_dir: Annotated[Path, typer.Option(help="where the bench checkpoint is built once")] = Path("build"),
    out: Annotated[Optional[Path], typer.Option(help="also write the table here")] = None,
    rows: Annotated[str, typer.Option(help="all, or pages: only rows p (a page asked 1, 4 and 10 questions)")] = "all",
) -> None:
    """Benchmark against this machine's limit: roofline, decode, mixed workload, queue, interactive latency."""
    _need_worker_extra()
    from tuwen.workers.bench.run import Options, run

    given = {k: v for k, v in dict(inputs=inputs, max_new_tokens=max_new_tokens, transport_jobs=transport_jobs,
                                   repeats=repeats, max_batch_size=batch_size,
                                   model_path=model_path, rows=rows).items() if v is not None}
    opts = Options.quick(cache_dir=cache_dir, **given) if quick else Options(cache_dir=cache_dir, **given)
    report = run(opts, log=lambda line: err.print(line, markup=False))
    text = report.markdown()
    console.print(text, markup=False, soft_wrap=True)
    if out:
        out.write_text(text + "\n", encoding="utf-8")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
