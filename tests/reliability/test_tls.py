"""A TLS broker (``rediss://``) gets what a plain one gets: tuwen's transport with its poison screen, and the
reaper that gives a killed worker's jobs back long before the visibility timeout. Before, both were left out
for ``rediss://`` (kombu's own transport read the queues), so a TLS deployment lost them silently."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tuwen.pipeline import deadletter
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings
from tests.drills import Lives, assert_kills_landed, check, kill_log, kill_repeatedly, outcome, submit_samples
from tests.faults import TlsRedis, report
from tests.s3servers import S3Endpoint

#: The production default: only the reaper brings a dead worker's jobs back within the drill's minutes.
DEFAULT_VISIBILITY_TIMEOUT_S = Settings.model_fields["visibility_timeout_s"].default


@pytest.mark.integration
@pytest.mark.timeout(360)
def test_a_tls_broker_screens_poison_and_reaps_a_killed_workers_jobs(s3: S3Endpoint, tmp_path: Path,
                                                                      lives: list[Lives]) -> None:
    t_start = time.monotonic()
    with TlsRedis() as server:
        # Given tuwen on a Redis that speaks only TLS, verified against its own CA, with production defaults
        settings = make_settings(server.url, s3, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                                 answer_cache=False)
        with pytest.raises(redis.ConnectionError):  # (a client without TLS gets nowhere)
            redis.Redis(port=server.port, socket_timeout=2).ping()
        r = connect(settings.redis_url)
        client = Client(settings)
        worker = Lives(settings, "tls@drill", tmp_path)
        lives.append(worker)
        worker.start()
        # When a poison message is pushed at the live worker's queue
        r.lpush(settings.interactive_queue, '{"foo":1}')
        # ... and 24 jobs run while the worker is killed with SIGKILL once, mid-job, and started again
        jobs = submit_samples(client, 24)
        deadline = time.monotonic() + 30
        while deadletter.size(r) < 1:
            assert time.monotonic() < deadline, worker.current.log_tail()
            time.sleep(0.1)
        kills = kill_repeatedly(worker, client, list(jobs), 1)
        t0 = time.monotonic()
        # Then the poison went to the dead-letter list, and every job was answered right, the killed ones again
        numbers, results = outcome(client, jobs, worker.logs, timeout=180, since=t0)
        report("kill -9 the worker once on a TLS broker (rediss://, default visibility timeout)", **numbers,
               kills=kill_log(kills), poison=deadletter.recent(r, 1)[0]["reason"],
               duration_s=round(time.monotonic() - t_start, 1))
        worker.stop()
        client.close()
        r.close()
    assert numbers["recover_s"] < DEFAULT_VISIBILITY_TIMEOUT_S / 4, numbers  # the reaper, not the timeout
    check(numbers, jobs, results)
    assert_kills_landed(kills, results, 1)
