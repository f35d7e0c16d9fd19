"""Batch webhooks: when a batch created with a ``callback_url`` ends, POST OpenAI's event for it
(``batch.completed``, ``batch.failed``, ``batch.expired`` or ``batch.cancelled``), signed and retried as a
job's webhook is (``webhooks``): ``X-Tuwen-Signature: sha256=<HMAC of "<timestamp>.<body>">`` with
``X-Tuwen-Timestamp``, the SSRF guard before every attempt (to the address it checked), no redirects,
exponential backoff up to ``TUWEN_WEBHOOK_MAX_ATTEMPTS``.

The body is OpenAI's event, ``{"id": "evt_…", "object": "event", "type": "batch.completed", "created_at",
"data": {"id": "batch_…"}}``; the receiver reads the batch with ``GET /v1/batches/{id}``. The delivery's
state is kept on the batch (its ``webhook``, as a job's is on the job) and a lock per batch keeps two
gateway processes from making the same attempt.
"""

from __future__ import annotations

import hashlib
import json
import time

import httpx

from tuwen.pipeline.bulk.model import Bulk, BulkState
from tuwen.pipeline.bulk.records import Records
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.locks import Locks
from tuwen.pipeline.schema import WebhookView
from tuwen.pipeline.gateway.ssrf import Target
from tuwen.pipeline.gateway.webhooks import FINAL_STATES, WebhookSettings, check_callback_url, next_attempt, post_signed

EVENTS = {BulkState.completed: "batch.completed", BulkState.failed: "batch.failed",
          BulkState.expired: "batch.expired", BulkState.cancelled: "batch.cancelled"}


def event_body(bulk: Bulk) -> bytes:
    """OpenAI's event for the batch's end, as compact UTF-8 JSON (the same bytes on every attempt)."""
    kind = EVENTS[bulk.state]
    event = {"id": "evt_" + hashlib.sha256(f"{bulk.id}\0{kind}".encode()).hexdigest()[:24], "object": "event",
             "type": kind, "created_at": int(bulk.finished_at or bulk.created_at), "data": {"id": bulk.id}}
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode("utf-8")


def owed(bulk: Bulk) -> bool:
    """Whether the batch has ended with a webhook still to deliver (retried or not yet tried)."""
    url = bulk.openai.callback_url if bulk.openai else None
    return bool(url) and bulk.state in EVENTS and (bulk.webhook is None or bulk.webhook.state not in FINAL_STATES)


class BatchWebhooks:
    """Makes the attempts; ``deliver`` is called by each gateway's ``BatchKeeper`` for ended batches."""

    def __init__(self, settings: WebhookSettings, records: Records, locks: Locks) -> None:
        self.settings, self.records, self.locks = settings, records, locks
        # As the job webhooks' client: no keep-alive (a pooled TLS connection must not carry a request for
        # another host name than its certificate's), no redirects, no proxies from the environment.
        self._http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False,
                                  limits=httpx.Limits(max_keepalive_connections=0),
                                  headers={"User-Agent": "tuwen-webhook/1"})

    def close(self) -> None:
        self._http.close()

    def deliver(self, bulk_id: str) -> str | None:
        """Make one attempt if one is due; returns the state written (None: nothing to do now)."""
        token = self.locks.acquire(Records.hook_lock_key(bulk_id), self.settings.webhook_timeout_s + 30)
        if token is None:
            return None  # another gateway process is making this attempt
        try:
            bulk = self.records.get(bulk_id)
            if not owed(bulk) or bulk.openai is None or bulk.openai.callback_url is None:
                return None
            url, now = bulk.openai.callback_url, time.time()
            hook = bulk.webhook or WebhookView(url=url, state="pending", created_at=now)
            if hook.state == "retrying" and (hook.next_attempt_at or 0) > now:
                return None
            attempt = hook.attempts + 1
            try:
                target = check_callback_url(url, self.settings)
            except InvalidInput as exc:
                self._record(bulk_id, hook, "refused", attempt, error=f"{exc.code}: {exc.message}")
                return "refused"
            status, error = self._post(bulk, target, attempt)
            state, next_at = next_attempt(self.settings, status, attempt, now)
            self._record(bulk_id, hook, state, attempt, status=status, error=error, next_at=next_at)
            return state
        finally:
            self.locks.release(Records.hook_lock_key(bulk_id), token)

    def _record(self, bulk_id: str, hook: WebhookView, state: str, attempts: int, *, status: int | None = None,
                error: str | None = None, next_at: float | None = None) -> None:
        self.records.set_webhook(bulk_id, hook.model_copy(update={
            "state": state, "attempts": attempts, "last_status": status, "last_error": (error or "")[:300] or None,
            "next_attempt_at": next_at, "delivered_at": time.time() if state == "delivered" else None}))

    def _post(self, bulk: Bulk, target: Target, attempt: int) -> tuple[int | None, str | None]:
        assert self.settings.webhook_secret is not None  # check_callback_url refuses without one
        return post_signed(self._http, self.settings.webhook_secret.get_secret_value(), target, event_body(bulk),
                           attempt, ("X-Tuwen-Batch-Id", bulk.id))
