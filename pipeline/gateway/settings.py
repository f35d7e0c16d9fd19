"""The gateway's settings: its own (``TUWEN_GATEWAY_*``, rate limit) on top of the webhooks' ones."""

from __future__ import annotations

from pydantic import Field

from tuwen.pipeline.gateway.batch_settings import BatchSettings
from tuwen.pipeline.settings import CommaList, Settings
from tuwen.pipeline.gateway.webhooks import WebhookSettings


class GatewaySettings(WebhookSettings, BatchSettings):
    """The gateway's own settings (``TUWEN_*``), next to the shared ``Settings``."""

    #: Interface ``tuwen gateway serve`` listens on (``0.0.0.0``: every interface, e.g. in a container).
    gateway_host: str = "127.0.0.1"
    #: Its port.
    gateway_port: int = Field(8000, ge=1, le=65535)
    #: Largest request body, counted while it streams in (413 beyond). 0: max_image_bytes + 64 KiB.
    gateway_max_upload_bytes: int = Field(0, ge=0)
    #: A connection must send a whole request head (line and headers) within this many seconds of opening
    #: (kept alive: of the next request's first byte), or it gets 408 and is closed (slowloris).
    gateway_header_timeout_s: float = Field(10.0, gt=0, le=300)
    #: A request's whole body must arrive within this many seconds of its head, or the connection is closed.
    gateway_body_timeout_s: float = Field(60.0, gt=0, le=3600)
    #: Open connections per gateway process; beyond it new requests get 503 (0: no limit).
    gateway_max_connections: int = Field(1000, ge=0)
    #: Cap on ``GET /v1/jobs/{id}?wait=N`` long-polls, in seconds.
    gateway_max_wait_s: float = Field(30.0, gt=0, le=600)
    #: How long an ``Idempotency-Key`` maps to its job.
    gateway_idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    #: Counted requests (submits, cancels, reads that find no job) per minute per API key (0: unlimited);
    #: ``tuwen keys create --rate-limit`` overrides it. Reading one's own jobs is free.
    rate_limit_per_minute: int = Field(120, ge=0)

    # -- the OpenAI-compatible chat API (``/v1/chat/completions``, docs/openai.md) -------------------------
    #: How long a chat request waits for the whole answer (streamed or not); past it the client gets the
    #: error ``timeout`` with the job id, to read the answer later from ``GET /v1/jobs/{id}``.
    gateway_chat_timeout_s: float = Field(60.0, gt=0, le=3600)
    #: Largest chat request body (pictures come base64-encoded in the JSON), counted while it streams in.
    #: 0: one picture of ``max_image_bytes`` as a data: URL, plus 1 MiB.
    gateway_max_chat_bytes: int = Field(0, ge=0)
    #: Fetch the http(s) picture URLs of chat and Responses requests (and batch lines), from public
    #: addresses only (the SSRF guard). false: every one is refused with ``image_url_not_allowed``.
    gateway_image_urls: bool = True
    #: Only these hosts' picture URLs are fetched: ``cdn.example.com``, ``*.example.com`` (comma-separated in
    #: env). Empty: any host whose addresses are all public.
    gateway_image_url_hosts: CommaList = Field(default_factory=list)
    #: For tests only: let picture URLs reach loopback and private addresses (off: the SSRF guard refuses
    #: them, on every redirect too, whatever the hosts list says).
    gateway_image_url_allow_private: bool = False
    #: A remote picture must arrive whole within this many seconds, resolving, connecting and redirects
    #: included, however slowly it trickles (``image_url_timeout``); and within ``max_image_bytes``.
    gateway_image_url_timeout_s: float = Field(10.0, gt=0, le=120)
    #: Redirects a picture URL may take, each checked by the SSRF guard; more: ``image_url_too_many_redirects``.
    gateway_image_url_max_redirects: int = Field(3, ge=0, le=10)
    #: More names for the served model in a chat request's ``model`` (comma-separated in env);
    #: ``tuwen`` always is one.
    gateway_model_aliases: CommaList = Field(default_factory=list)

    def upload_limit(self, settings: Settings) -> int:
        return self.gateway_max_upload_bytes or settings.max_image_bytes + 64 * 1024
