"""The answer cache: a repeated (owner, image, question, generation params, model) is answered without
the model. Image keys are content hashes, so the same picture uploaded twice (by one owner) hits the same entry.

Entries are per owner. A shared entry would tell owner B that someone else already asked this question
about this picture: B's answer would come back marked ``cached``, faster, and without a batch size or
model time. Within one owner a cached result still says ``cached`` and carries no ``batch_size`` or
``generate_ms``: no model ran for it, and inventing those numbers would make the timings and batch
statistics false, while an owner learns nothing from it but its own history.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import redis

from tuwen.pipeline.jobs import cache_prefix
from tuwen.pipeline.schema import JobRequest

log = logging.getLogger(__name__)


def cache_key(job: JobRequest, model_id: str) -> str:
    """The entry for the whole conversation (every turn and picture) of this owner, filed under its
    first picture and owner so that deleting that picture, or the owner's last job on it, finds it."""
    ident = json.dumps([job.owner, [m.model_dump(mode="json") for m in job.messages],
                        job.params.model_dump(mode="json"), model_id], ensure_ascii=False)
    return cache_prefix(job.image_key or "", job.owner) + hashlib.sha256(ident.encode()).hexdigest()


class AnswerCache:
    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis, self.ttl_s = redis, ttl_s

    def lookup(self, jobs: list[JobRequest], model_id: str) -> dict[str, dict[str, Any]]:
        """``{job id: cached entry}`` for the jobs the cache knows."""
        if not jobs:
            return {}
        try:
            values = self.redis.mget([cache_key(j, model_id) for j in jobs])
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # the cache only saves work: all misses
            log.warning("answer cache unreachable, answering %d jobs afresh: %s", len(jobs), exc)
            return {}
        return {j.id: json.loads(v) for j, v in zip(jobs, values) if v}

    def store(self, entries: list[tuple[JobRequest, dict[str, Any]]], model_id: str) -> None:
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job, entry in entries:
            pipe.set(cache_key(job, model_id), json.dumps(entry, ensure_ascii=False), ex=self.ttl_s)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("answer cache unreachable, %d answers not cached: %s", len(entries), exc)

