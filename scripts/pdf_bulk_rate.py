"""A 100-page PDF × 5 questions through the bulk path, end to end: a private Redis, local storage and one demo
worker, its answer cache off (the scenes repeat: a cached answer would cost nothing); each run draws a fresh
worksheet PDF, submits it as
``tuwen bulk submit --pdf --questions`` does (``PdfSource``), and waits until every line is answered. Prints per
run the pages/s end to end, the submission's share, rendering's share (the same pages rendered alone, as the
submitter renders them) and how many answers name their page's facts; then the min–max over the runs.

    .venv/bin/python scripts/pdf_bulk_rate.py [--pages 100] [--runs 3] [--side 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from tuwen.pipeline.bulk.pdfs import PdfSource
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.pdf import render_pdf
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.demo.scenes import draw_worksheet_example, has_facts

#: Five questions that fit every page, with the kind whose facts answer each.
QUESTIONS = {"shape": "图中是什么形状？", "colour": "图形是什么颜色的？", "count": "数一数，图中一共有几个图形？",
             "shape2": "这是什么图形？", "colour2": "这是什么颜色？"}


def worksheet(path: Path, pages: int, seed: int) -> list[dict[str, tuple[str, ...]]]:
    """Write a ``pages``-page PDF of worksheet scenes; returns each page's facts per question."""
    pictures, facts = [], []
    for n in range(pages):
        drawn = {k: draw_worksheet_example(random.Random(seed * 100_000 + n), k) for k in ("shape", "colour", "count")}
        pictures.append(drawn["shape"].image)
        facts.append({q: drawn[q.rstrip("2")].facts for q in QUESTIONS})
    pictures[0].save(path, "PDF", save_all=True, append_images=pictures[1:], resolution=72.0)
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--side", type=int, default=1024, help="TUWEN_PDF_PAGE_SIDE")
    parser.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuwen-pdf-") as tmp, LocalRedis() as redis:
        root = Path(tmp)
        settings = Settings(redis_url=redis.url, storage_dir=root / "storage", model_path=bundled_demo_model(),
                            interactive_queue="pdf-i", bulk_queue="pdf-b", max_batch_size=32, max_new_tokens=32,
                            pdf_page_side=args.side, answer_cache=False)
        worker = WorkerProcess(settings, "pdf-bench", root / "worker.log", threads=args.threads).start()
        client = Client(settings)
        try:
            worker.wait_ready(timeout=180)
            store = BulkStore(client)
            rates = []
            for run in range(args.runs):
                pdf = root / f"book-{run}.pdf"
                facts = worksheet(pdf, args.pages, seed=run + 1)
                (root / "questions.txt").write_text("\n".join(QUESTIONS.values()) + "\n", encoding="utf-8")
                t0 = time.monotonic()
                bulk = store.submit(PdfSource(pdf, list(QUESTIONS.values())), owner="bench", fresh=True)
                submitted = time.monotonic() - t0
                bulk = store.wait(bulk.id, poll_s=0.2)
                elapsed = time.monotonic() - t0
                lines = list(store.results(bulk.id))
                right = sum(has_facts(x["answer"] or "", facts[x["page"] - 1][list(QUESTIONS)[i % 5]])
                            for i, x in enumerate(lines))
                r0 = time.perf_counter()
                render_pdf(pdf.read_bytes(), settings)
                rendering = time.perf_counter() - r0
                rates.append(args.pages / elapsed)
                print(f"run {run + 1}: {args.pages} pages × {len(QUESTIONS)} questions = {len(lines)} lines in "
                      f"{elapsed:.1f} s: {args.pages / elapsed:.2f} pages/s ({len(lines) / elapsed:.1f} answers/s); "
                      f"submission {submitted:.1f} s ({submitted / elapsed:.0%}), rendering alone {rendering:.2f} s "
                      f"({rendering / elapsed:.1%}); {len({x['image_key'] for x in lines})} pictures stored; "
                      f"{right}/{len(lines)} answers name their page's facts; "
                      f"state {bulk.state.value}", flush=True)
            print(f"pages/s end to end: {min(rates):.2f}–{max(rates):.2f} over {args.runs} runs "
                  f"(TUWEN_PDF_PAGE_SIDE {args.side}, worker threads {args.threads})")
        finally:
            client.close()
            worker.stop()


if __name__ == "__main__":
    main()
