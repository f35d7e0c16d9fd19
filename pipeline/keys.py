"""Every Redis key tuwen writes, in one place (``<prefix><id>``). Nothing else spells a key.

Celery's own keys (the queues, ``unacked``, ``unacked_index``, ``_kombu.*``) belong to kombu and are
named by the queue settings, not here.
"""

from __future__ import annotations

ROOT = "tuwen:"

#: List per queue of wake tokens: a producer pushes one after each message it publishes, and an idle
#: worker waits on these lists rather than on the queues (``workers.serve.transport``); capped at
#: ``WAKE_CAP`` tokens.
WAKE = ROOT + "wake:"
WAKE_CAP = 64
#: Hash per job: state, request, result, owner, attempts (``jobs``).
JOB = ROOT + "job:"
#: Pub/sub channel per job, published when the job ends (``jobs.wait``).
DONE = ROOT + "done:"
#: Set per stored picture: the ids of the jobs that use it (a picture goes when its last job goes).
IMAGE_REFS = ROOT + "imageref:"
#: Set per stored picture: the owners who uploaded it (only they may name it by key).
IMAGE_OWNERS = ROOT + "imageowner:"
#: Answer cache: ``cache:<picture digest>:<owner digest>:<entry digest>``, per owner.
CACHE = ROOT + "cache:"
#: Stream per job of the answer's text as it is generated (``streams``).
STREAM = ROOT + "stream:"
#: Hash per bulk, plus ``:lines``, ``:lock`` and ``:hook`` (its webhook's delivery lock); ``index`` orders
#: them by creation, ``owner:<owner>`` (sorted set) each owner's.
BULK = ROOT + "batch:"
#: ``<bulk queue>``: a set of the batches created over HTTP (``POST /v1/batches``) still to tend: validating,
#: submitting, running, or owing their webhook. Every gateway process on that bulk queue tends them (so one
#: picks them up after another died); gateways on other queues leave them alone.
BATCHES_TENDED = ROOT + "batches:tended:"
#: Hash per file of the Batch API (``file-…``: its name, owner, purpose, size and parts; the bytes are in
#: the object store under ``files/<id>/``), plus ``:readers`` (the batches still reading it); and
#: ``owner:<owner>`` (sorted set), each owner's files by time.
FILE = ROOT + "file:"
#: Hash per stored response of the Responses API (by job id): its owner, the request's facts and conversation
#: (pictures as keys), and the job's result once it ended; it lives as long as the job's record.
RESPONSE = ROOT + "response:"
#: Hash per API key (by the key's digest), plus ``rate:<key id>`` (sorted set: the times of its requests in
#: the rate limit's window); and the gateway's idempotency records.
API_KEY = ROOT + "apikey:"
IDEMPOTENCY = ROOT + "gateway:idem:"
#: Webhook deliveries: state per job and the schedule of retries.
WEBHOOK = ROOT + "webhook:"
#: Worker heartbeats (one key per worker, with a TTL).
WORKER = ROOT + "worker:"
#: Per-minute counters of finished jobs by status and code.
STATS = ROOT + "stats:"
#: Poison queue messages moved aside, newest first.
DEAD_LETTER = ROOT + "deadletter"
