"""The answer cache: a repeated (image, question, generation params, model) is answered without the
model. Image keys are content hashes, so the same picture uploaded twice hits the same entry."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tuwen.pipeline.jobs import cache_prefix
from tuwen.pipeline.schema import JobRequest

def cache_key(job: JobRequest, model_id: str) -> str:
    ident = json.dumps([job.image_key, job.question, job.params.model_dump(), model_id], ensure_ascii=False)
    return cache_prefix(job.image_key) + hashlib.sha256(ident.encode()).hexdigest()


class AnswerCache:
    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis, self.ttl_s = redis, ttl_s

    def lookup(self, jobs: list[JobRequest], model_id: str) -> dict[str, dict[str, Any]]:
        """``{job id: cached entry}`` for the jobs the cache knows."""
        if not jobs:
            return {}
        values = self.redis.mget([cache_key(j, model_id) for j in jobs])
        return {j.id: json.loads(v) for j, v in zip(jobs, values) if v}

    def store(self, entries: list[tuple[JobRequest, dict[str, Any]]], model_id: str) -> None:
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job, entry in entries:
            pipe.set(cache_key(job, model_id), json.dumps(entry, ensure_ascii=False), ex=self.ttl_s)
        pipe.execute()

