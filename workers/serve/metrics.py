"""Prometheus metrics of one worker process, served on ``TUWEN_METRICS_ADDRESS:TUWEN_METRICS_PORT``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tuwen.pipeline import sentinel

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class QueueDepth(Collector):
    """Jobs waiting per queue, read from the Redis broker at scrape time."""

    def __init__(self, redis: Any, queues: Iterable[str]) -> None:
        self.redis, self.queues = redis, list(queues)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tuwen_queue_depth", "Jobs waiting in the broker queue", labels=["queue"])
        for queue in self.queues:
            try:
                family.add_metric([queue], float(self.redis.llen(queue)))
            except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
                continue
        yield family


class GrammarStats(Collector):
    """Constrained answers' grammar compiles, read from the runtime's compiler at scrape time."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[CounterMetricFamily]:
        grammars = self.runtime.grammars
        for name, what, attr in (("compiles", "Grammars compiled for response_format (per format and model)",
                                  "compiles"),
                                 ("cache_hits", "response_format grammars found compiled", "hits"),
                                 ("compile_seconds", "Time spent compiling response_format grammars", "compile_s")):
            value = getattr(grammars, attr) if grammars is not None else 0
            yield CounterMetricFamily(f"tuwen_grammar_{name}", what, value=value)


class ReuseStats(Collector):
    """The encoder and prefix caches (``engine.reuse``), read from the runtime at scrape time: hits, misses,
    evictions and bytes held. A prefix hit is a row that found its prefix (cached, or a join-mate's prefill);
    a miss, a row with pictures that prefilled it."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        reuse = getattr(self.runtime, "reuse", None) if getattr(self.runtime, "_model", None) is not None else None
        for cache, what in (("encoder", "pictures' projected features"),
                            ("prefix", "prompt prefixes' key/value cache")):
            lru = getattr(reuse, "features" if cache == "encoder" else "prefixes", None)
            hits = (reuse.prefix_hits if cache == "prefix" else lru.hits) if lru is not None else 0
            misses = (reuse.prefix_misses if cache == "prefix" else lru.misses) if lru is not None else 0
            yield CounterMetricFamily(f"tuwen_{cache}_cache_hits", f"Lookups that found {what}", value=hits)
            yield CounterMetricFamily(f"tuwen_{cache}_cache_misses", f"Lookups that computed {what}", value=misses)
            yield CounterMetricFamily(f"tuwen_{cache}_cache_evictions", f"Entries of {what} let go for room",
                                      value=lru.evictions if lru is not None else 0)
            yield GaugeMetricFamily(f"tuwen_{cache}_cache_bytes", f"Bytes of {what} kept",
                                    value=lru.used if lru is not None else 0)


class WorkerMetrics:
    """All metrics in one private registry (so tests can build several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.batch_size = Histogram("tuwen_batch_size", "Jobs per hand-over from the queue to the decode loop",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.running_rows = Gauge("tuwen_running_rows", "Jobs decoding together right now (continuous batching)",
                                  registry=r)
        self.parked_rows = Gauge("tuwen_parked_rows", "Bulk jobs out of the batch, giving way to interactive ones",
                                 registry=r)
        self.rows_per_answer = Histogram("tuwen_model_batch_rows", "Most rows that decoded alongside a job",
                                         buckets=_BATCH_BUCKETS, registry=r)
        self.first_token = Histogram("tuwen_time_to_first_token_seconds",
                                     "From a job joining the decode loop to its first token", buckets=_SECONDS,
                                     registry=r)
        self.queue_wait = Histogram("tuwen_queue_wait_seconds", "Submit to batch start", buckets=_SECONDS, registry=r)
        self.model_seconds = Histogram("tuwen_model_seconds", "Model time per job (joining the decode loop to its last token)",
                                       buckets=_SECONDS, registry=r)
        self.generated_tokens = Counter("tuwen_generated_tokens", "Tokens generated", registry=r)
        self.jobs = Counter("tuwen_jobs", "Jobs finished", ["status", "code"], registry=r)
        self.model_load = Gauge("tuwen_model_load_seconds", "Time to load the model", registry=r)
        self.images_fetched = Counter("tuwen_images_fetched", "Images fetched from storage", registry=r)
        self.image_bytes = Counter("tuwen_image_bytes", "Image bytes fetched from storage", registry=r)
        self.cache_hits = Counter("tuwen_answer_cache_hits", "Jobs answered from the answer cache", registry=r)
        self.cache_misses = Counter("tuwen_answer_cache_misses", "Jobs the answer cache did not know", registry=r)
        self.poison = Counter("tuwen_poison_messages", "Queue messages refused and moved to the dead-letter list",
                              ["reason"], registry=r)
        self.recovered = Counter("tuwen_recovered_messages", "Jobs of dead workers put back on their queue",
                                 registry=r)
        self.device_memory = Gauge("tuwen_device_memory_bytes", "CUDA memory allocated (peak since start)",
                                   ["kind"], registry=r)
        r.register(sentinel.collector())  # Redis failovers followed, writes not replicated in time

    def watch_queues(self, redis: Any, queues: Iterable[str]) -> None:
        self.registry.register(QueueDepth(redis, queues))

    def watch_grammars(self, runtime: Any) -> None:
        self.registry.register(GrammarStats(runtime))

    def watch_reuse(self, runtime: Any) -> None:
        self.registry.register(ReuseStats(runtime))

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``address:port`` (``TUWEN_METRICS_ADDRESS``; this host only by default)."""
        start_http_server(port, addr=address, registry=self.registry)

    def observe_answer(self, answer: Any) -> None:
        """One answered job: its time to first token, model time and the batch it decoded in."""
        timings = answer.timings
        if "first_token_ms" in timings:
            self.first_token.observe(timings["first_token_ms"] / 1000)
        if "generate_ms" in timings:
            self.model_seconds.observe(timings["generate_ms"] / 1000)
        self.rows_per_answer.observe(answer.batch_size)

    def observe_device(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.device_memory.labels("allocated").set(torch.cuda.memory_allocated())
            self.device_memory.labels("peak").set(torch.cuda.max_memory_allocated())
