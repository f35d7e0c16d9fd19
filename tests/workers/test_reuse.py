"""Reuse's bounds (``engine.reuse``): the encoder and prefix caches never hold more bytes than their settings
allow, least recently used out first; and the policy's grouping of a join's rows by prefix."""

from __future__ import annotations

from typing import Any

import pytest

from tests.workers.test_engine import engine_for, rows_for
from tests.workers.test_families import items
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.engine.model import Runtime
from tuwen.workers.engine.policy import shared_prefill
from tuwen.workers.engine.reuse import Lru, Reuse


def test_lru_keeps_within_its_bytes_and_counts() -> None:
    lru = Lru(100)
    for key in (b"a", b"b", b"c"):
        lru.put(key, key, 40)
        assert lru.used <= 100
    assert b"a" not in lru and (b"b" in lru) and (b"c" in lru) and lru.evictions == 1
    assert lru.get(b"b") == b"b" and lru.get(b"a") is None and (lru.hits, lru.misses) == (1, 1)
    lru.put(b"d", b"d", 40)  # b was used last: c goes
    assert b"c" not in lru and b"b" in lru and lru.used == 80
    lru.put(b"huge", b"huge", 101)
    assert b"huge" not in lru and lru.used == 80, "a value over the whole bound is not kept (and evicts nothing)"


@pytest.mark.parametrize("prefixes, cached, plain, groups", [
    ([None, None], set(), [0, 1], []),
    (["p", "q", "p", None, "p"], set(), [1, 3], [[0, 2, 4]]),
    (["p", "q"], {"q"}, [0], [[1]]),  # one row whose prefix is cached still reuses it
])
def test_policy_groups_rows_by_prefix(prefixes: list[str | None], cached: set[str], plain: list[int],
                                      groups: list[list[int]]) -> None:
    assert shared_prefill(prefixes, cached) == (plain, groups)


def test_memory_caps_hold_and_least_recent_goes_first() -> None:
    """Pictures asked about one after another through bounds of about one and a half of each cache's
    entries: each cache holds one entry at a time, within its bytes, and answers stay those without reuse."""
    rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=4))
    rt.load()
    its = items(4)[:4]
    plain = [f.tokens for f in engine_for(rt).run(rows_for(rt, its))]
    probe = Reuse(rt.model, 1 << 30, 1 << 30)
    engine = engine_for(rt)
    engine.reuse = probe
    engine.run(rows_for(rt, its[:1]))
    one_feature, one_prefix = probe.features.used, probe.prefixes.used
    assert one_feature and one_prefix
    reuse = Reuse(rt.model, one_feature * 3 // 2, one_prefix * 3 // 2)
    engine.reuse = reuse
    got = []
    for it in its:
        got += [f.tokens for f in engine.run(rows_for(rt, [it]))]
        assert reuse.features.used <= one_feature * 3 // 2 and reuse.prefixes.used <= one_prefix * 3 // 2
        assert len(reuse.features) == len(reuse.prefixes) == 1
    assert got == plain
    assert reuse.features.evictions == reuse.prefixes.evictions == len(its) - 1


def test_the_hand_over_orders_its_buffer_by_picture_affinity() -> None:
    """The worker's hand-over (``serve.tasks.Handover``) reads each buffered message's pictures (per owner)
    and hands over the oldest first, then its page-mates, then pictures it handed over lately; interactive
    jobs stay ahead of bulk ones."""
    from types import SimpleNamespace

    from tuwen.pipeline.schema import JobRequest
    from tuwen.workers.serve.tasks import Handover

    def message(n: int, key: str, owner: str = "a", queue: str = "bulk") -> Any:
        job = JobRequest(id=f"job-{n:04d}", image_key=key, question="几个？", owner=owner).model_dump(mode="json")
        return SimpleNamespace(id=job["id"], kwargs={"job": job}, delivery_info={"routing_key": queue})

    handover = Handover()
    handover._warm_up([frozenset({("a", "images/warm")})])
    held = [message(1, "images/x"), message(2, "images/warm", owner="b"), message(3, "images/warm"),
            message(4, "images/x"), message(5, "images/y", queue="interactive")]
    assert [r.id for r in handover._by_affinity(held)] == ["job-0005", "job-0001", "job-0004", "job-0003", "job-0002"]


def test_the_bench_page_rows_measure_reuse_against_without() -> None:
    """``tuwen bench --rows pages`` (``bench.pages.measure``) on the demo model: a page's questions in one join
    share one prefill with reuse, asked one by one they find it cached, and the answers are those without."""
    from tuwen.workers.bench.pages import PAGE_QUESTIONS, measure
    from tuwen.workers.demo.samples import load_samples

    rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=4))
    rt.load()
    rt.min_new_tokens = 4
    picture = load_samples()[1].path.read_bytes()
    on, off = (measure(rt, picture, PAGE_QUESTIONS[:4], 4, reuse) for reuse in (True, False))
    assert on.tokens == off.tokens and all(len(t) == 4 for t in on.tokens) and off.reuse is None
    assert on.reuse is not None and (on.reuse.prefix_hits, on.reuse.prefix_misses) == (3, 1)
    assert 0 < on.prefill_s < on.seconds
    by_one = measure(rt, picture, PAGE_QUESTIONS[:4], 4, True, one_by_one=True)
    assert by_one.tokens == off.tokens and by_one.reuse is not None and by_one.reuse.prefix_hits == 3


def test_one_setting_turns_reuse_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TUWEN_PREFIX_REUSE=0``: the runtime keeps no caches and its engines prefill every row whole."""
    monkeypatch.setenv("TUWEN_PREFIX_REUSE", "0")
    off = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1))
    assert off.reuse is None and off.engine().reuse is None
    monkeypatch.delenv("TUWEN_PREFIX_REUSE")
    on = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1))
    assert on.reuse is not None and on.engine().reuse is on.reuse
