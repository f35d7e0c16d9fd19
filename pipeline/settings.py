"""One settings object for every entry point (worker, client, CLI, tests), read from ``TUWEN_*``."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tuwen.pipeline import sentinel
from tuwen.pipeline.schema import MAX_NEW_TOKENS

#: The example secrets of ``.env.example`` (and their like): a service refuses to start with one of them.
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "change-me-to-a-long-random-string", "replace-me",
                                 "secret", "password"})
#: URL schemes for ``TUWEN_REDIS_URL`` and (with the AMQP ones) ``TUWEN_BROKER_URL``.
REDIS_SCHEMES = ("redis", "rediss", "unix", sentinel.SCHEME)
BROKER_SCHEMES = REDIS_SCHEMES + ("amqp", "amqps", "pyamqp")


def data_home() -> Path:
    """tuwen's per-user data directory: ``$XDG_DATA_HOME/tuwen``, else ``~/.local/share/tuwen`` (the XDG base
    directory spec; a relative ``XDG_DATA_HOME`` is ignored, as the spec says). Absolute, and the same for
    every command one user runs, from whatever folder."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "tuwen"


def default_storage_dir() -> Path:
    return data_home() / "storage"


def is_placeholder(secret: str) -> bool:
    """True for an example value such as ``change-me`` or ``change-me-to-a-long-random-string``."""
    value = secret.strip().lower()
    return value in PLACEHOLDER_SECRETS or value.startswith(("change-me", "changeme"))


class Quantization(str, Enum):
    """How the worker loads the language model's weights (one explicit ``BitsAndBytesConfig`` each)."""

    none = "none"
    int8 = "int8"
    nf4 = "nf4"


class DType(str, Enum):
    auto = "auto"  #: float32 on CPU, bfloat16 on CUDA
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class CpuLinear(str, Enum):
    """Which kernels run a CPU worker's linear layers (float32 / bfloat16, not quantized)."""

    onednn = "onednn"  #: oneDNN with weights packed once at load (``workers/engine/packed.py``)
    aten = "aten"  #: PyTorch's own ``F.linear`` (MKL / OpenBLAS)


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return json.loads(value) if value.lstrip().startswith("[") else [
            v.strip() for v in value.split(",") if v.strip()]
    return value


#: A list setting: comma-separated in the environment (``a.example.com,*.b.example.com``), or a JSON array.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_list)]


class TuwenSettings(BaseSettings):
    """The base of every settings class (``Settings``, the gateway's, the Batch API's, the webhooks', the
    worker's test hooks): read from ``TUWEN_*`` only (no .env file), unknown variables ignored, an empty
    variable taken as unset, frozen, and no input echoed in an error message (it may be a secret)."""

    model_config = SettingsConfigDict(env_prefix="TUWEN_", env_file=None, extra="ignore", frozen=True,
                                      env_ignore_empty=True, hide_input_in_errors=True)


class Settings(TuwenSettings):
    """Everything configurable. Built once at each entry point and passed down; never read at import."""

    # -- model / worker runtime ------------------------------------------------------------------
    #: Checkpoint directory (any llava-hf / Qwen-VL style directory). Empty: the bundled demo model.
    model_path: Path | None = None
    #: ``auto`` picks CUDA when available; else ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"
    #: ``auto`` (float32 on CPU, bfloat16 on CUDA), ``float32``, ``bfloat16`` or ``float16``.
    dtype: DType = DType.auto
    #: ``none``, ``int8`` or ``nf4`` (bitsandbytes; the language model's linear layers only).
    quantization: Quantization = Quantization.none
    #: The server's cap on an answer's tokens. A job that asks for more is refused (``invalid_params``,
    #: naming this cap), never quietly lowered; a job that asks for none gets what is left of the model's
    #: context after its prompt, up to this cap.
    max_new_tokens: int = Field(1024, ge=1, le=MAX_NEW_TOKENS)
    #: A sanity cap on a conversation's text, all turns together, in characters: longer is refused before
    #: it is queued. Far above any real prompt: the model's context, in tokens, is what decides
    #: (``context_too_long``, or ``truncation: oldest_turns``).
    max_conversation_chars: int = Field(200_000, ge=1)
    #: torch threads for a CPU worker (0: torch's default).
    torch_threads: int = Field(0, ge=0)
    #: A CPU worker's linear-layer kernels: ``onednn`` (weights packed once at load; 2-3x PyTorch's
    #: default on the skinny matrices of decode where MKL takes a generic path) or ``aten``.
    cpu_linear: CpuLinear = CpuLinear.onednn

    # -- worker operations -----------------------------------------------------------------------------
    #: Port for the worker's Prometheus metrics (0: off).
    metrics_port: int = Field(0, ge=0, le=65535)
    #: Interface the metrics listen on: ``127.0.0.1`` (this host only) or ``0.0.0.0`` (e.g. a container
    #: network that Prometheus scrapes from).
    metrics_address: str = "127.0.0.1"
    #: A worker whose queues have had jobs waiting this long while it took none (though it had room,
    #: or its consuming loop had stopped) exits with status 75, so that its supervisor restarts it.
    stall_timeout_s: int = Field(60, ge=5)
    #: A warm shutdown (SIGTERM) still running after this long ends anyway (exit status 1), e.g. when
    #: Redis is gone; the jobs it held are put back by the other workers. Keep it under the supervisor's
    #: grace period (compose: ``stop_grace_period``).
    shutdown_timeout_s: float = Field(90.0, ge=1)
    #: Show question and answer text in Flower (task arguments/results). Off: they may be students' data.
    flower_show_text: bool = False
    #: Answer a repeated (image, question, params, model) from a cache, without the model.
    answer_cache: bool = True
    #: How long a cached answer is kept.
    answer_cache_ttl_s: int = Field(24 * 3600, ge=1)
    #: How long a batch keeps retrying unreachable storage before it gives its jobs back to the queue.
    storage_wait_s: float = Field(60.0, ge=0)

    # -- batching ------------------------------------------------------------------------------------
    #: Most jobs decoding together (rows of the running batch). Jobs join it in groups of at most 8 (4 while
    #: interactive jobs are about), one prefill each. Wider is faster per token (docs/performance.md);
    #: ``max_batch_tokens`` bounds memory.
    max_batch_size: int = Field(64, ge=1, le=512)
    #: Most tokens the running batch may hold (each row's prompt plus its answer budget): a memory bound
    #: for long conversations. 0: no bound beyond ``max_batch_size``.
    max_batch_tokens: int = Field(32_768, ge=0)
    #: Most bulk rows decoding beside interactive ones: while interactive jobs run or wait, the other bulk
    #: rows give way (they leave the batch with their cache and come back where they left off) and no bulk
    #: job joins, so an interactive job decodes in a small batch. ``max_batch_size`` or more: bulk rows
    #: never give way (docs/performance.md measures both).
    bulk_rows_beside_interactive: int = Field(8, ge=0)
    #: How long a job waits for others to join it when the model has room (continuous batching lets later
    #: jobs join between decode steps anyway).
    batch_wait_ms: int = Field(50, ge=0, le=60_000)
    #: Groups of jobs a worker can prepare at once (pictures fetched and preprocessed) while its decode
    #: loop is full. A group's pool thread waits until its last job is answered, so the worker runs one
    #: thread per possible decoding group (``max_batch_size``) plus these (``Settings.pool_threads``).
    worker_groups: int = Field(4, ge=1, le=64)

    # -- reuse: each picture seen once per worker (docs/performance.md) -----------------------------------
    #: Compute the prompt prefix that rows share (system prompt, earlier turns, the pictures) once: rows of one
    #: join with the same prefix share one prefill, and a later row finds it cached. Off: every row is
    #: prefilled whole, and no picture's features or prefix is kept.
    prefix_reuse: bool = True
    #: Bytes of projected picture features a worker keeps (the encoder cache; per owner, least recently used
    #: out first). 0 keeps none.
    encoder_cache_mb: int = Field(256, ge=0)
    #: Bytes of prompt-prefix key/value cache a worker keeps (per owner, least recently used out first),
    #: besides the running batch's. 0 keeps none (rows of one join still share a prefill).
    prefix_cache_mb: int = Field(512, ge=0)

    # -- queue ---------------------------------------------------------------------------------------
    #: Redis for job state, results and (by default) the queue; ``redis+sentinel://h1:26379,h2:26379/<service>/<db>``
    #: follows a Sentinel deployment's primary through failovers (docs/deployment.md).
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Replicas that must hold a job's record, and its result, before the client is told of them (Redis
    #: ``WAIT``), so that a failover cannot lose what a client was told. Unset: 1 with Sentinel, else 0 (off).
    redis_replicas_ack: int | None = Field(None, ge=0, le=16)
    #: Longest a write waits for those replicas; past it the call fails as retryable (``service_unavailable``),
    #: logged and counted: the write may be on a server that is no longer the primary.
    redis_replicas_ack_timeout_ms: int = Field(1000, ge=1, le=60_000)
    #: Celery broker; defaults to ``redis_url``. Job state always lives in Redis.
    broker_url: str | None = None
    #: Queue for interactive jobs; workers always read it before the bulk queue.
    interactive_queue: str = "interactive"
    #: Queue for bulk batches.
    bulk_queue: str = "bulk"
    #: Seconds before Redis hands an unacknowledged job to another worker. Must exceed the longest
    #: time a job can sit prefetched plus the longest batch.
    visibility_timeout_s: int = Field(600, ge=10)
    #: How long job records and results are kept.
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    #: Attempts before a job whose processing keeps failing is failed for good.
    max_attempts: int = Field(3, ge=1, le=20)

    # -- storage ---------------------------------------------------------------------------------------
    #: ``host:port`` of MinIO / any S3 server. Empty: images are kept in ``storage_dir``.
    minio_endpoint: str | None = None
    #: S3 credentials; set them from the environment or a secret store, never in code.
    minio_access_key: str = "minioadmin"
    #: The S3 secret (a placeholder such as ``change-me`` is refused when an endpoint is set).
    minio_secret_key: SecretStr = SecretStr("minioadmin")
    #: The bucket (created private if missing).
    minio_bucket: str = "tuwen"
    #: Use HTTPS to reach the S3 endpoint.
    minio_secure: bool = False
    #: S3 region, if the server needs one.
    minio_region: str | None = None
    #: Directory for images when no S3 endpoint is configured (single machine). Made absolute when read, so
    #: that every process of one user finds the same pictures whatever folder it was started from.
    storage_dir: Path = Field(default_factory=default_storage_dir, json_schema_extra={
        "shown_default": "`$XDG_DATA_HOME/tuwen/storage` (`~/.local/share/tuwen/storage`)"})
    #: Stored images are deleted this many days after upload (S3 lifecycle rule; a local directory is
    #: swept at start-up). Job records and results expire after ``result_ttl_s``.
    image_ttl_days: int = Field(7, ge=1, le=3650)

    # -- input limits ----------------------------------------------------------------------------------
    #: Largest upload accepted, in bytes.
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    #: Largest picture accepted, in pixels (checked from the header: decompression bombs never decode).
    max_image_pixels: int = Field(40_000_000, ge=1)
    #: Longest side over shortest side; beyond this a picture is refused.
    max_aspect_ratio: float = Field(20.0, ge=1.0)
    #: Dynamic-resolution families (Qwen2-VL, Qwen2.5-VL): the most image tokens one picture may
    #: become; bigger pictures are scaled down first. Lowers the checkpoint's own limit, never raises it.
    max_image_tokens: int = Field(1280, ge=4, le=16384)
    #: Most pictures in one job (a conversation's pictures together). Lowers the model family's own
    #: limit (4 for LLaVA, 8 for Qwen-VL), never raises it; past it a job is refused with too_many_images.
    max_images_per_job: int = Field(8, ge=1, le=64)
    #: The fewest image tokens per picture (small pictures are scaled up); 0 keeps the checkpoint's
    #: own minimum. Clipped to half of ``max_image_tokens``.
    min_image_tokens: int = Field(0, ge=0, le=16384)
    #: Largest PDF accepted, in bytes (a chat file part, an uploaded user_data file, a bulk line's PDF).
    max_pdf_bytes: int = Field(64 * 1024 * 1024, ge=1)
    #: Most pages one PDF may have; past it the PDF is refused with too_many_pages before any is rendered.
    max_pdf_pages: int = Field(500, ge=1, le=100_000)
    #: A PDF page is rendered with its long side this many pixels. Unset: the served family's preferred
    #: picture size, as its live workers announce it (336 for LLaVA-1.5, 672 for LLaVA-NeXT, about 1,200 for
    #: Qwen2-VL at the default max_image_tokens), else 1024. The processor resizes it as any picture.
    pdf_page_side: int | None = Field(None, ge=32, le=8192)
    #: Pages are never rendered below this many dots per inch (small print stays legible): a big page is
    #: drawn bigger instead, and refused with pdf_page_too_large when that is over max_image_pixels.
    pdf_min_dpi: float = Field(72.0, ge=1.0, le=1200.0)

    # -- spoken questions ----------------------------------------------------------------------------
    #: Largest audio file accepted (a spoken question), in bytes; OpenAI's transcription limit.
    max_audio_bytes: int = Field(25 * 1024 * 1024, ge=1)
    #: Longest spoken question accepted, in seconds (by the header, and again as it decodes).
    max_audio_seconds: float = Field(60.0, gt=0, le=3600)
    #: Queue of the speech stage: audio jobs are transcribed here, then go on to the picture queues.
    speech_queue: str = "speech"
    #: The speech worker's checkpoint: any local Whisper-family directory (``AutoModelForSpeechSeq2Seq``).
    speech_model_path: Path | None = None
    #: Most audio jobs the speech worker transcribes in one batch.
    speech_batch_size: int = Field(8, ge=1, le=256)
    #: Most tokens of one transcript (Whisper's decoder holds 448 with its prompt).
    speech_max_new_tokens: int = Field(224, ge=1, le=440)

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _known_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        """``localhost:6379`` is refused here with a clear message, not deep in redis-py."""
        schemes = BROKER_SCHEMES if info.field_name == "broker_url" else REDIS_SCHEMES
        scheme, sep, _ = (value or "").partition("://")
        if value is not None and (not sep or scheme not in schemes):
            raise ValueError(f"not a URL tuwen can use: it must start with {', '.join(s + '://' for s in schemes)} "
                             "(for example redis://127.0.0.1:6379/0)")
        sentinel.parse(value or "")  # a malformed Sentinel URL says how it should look
        return value

    @field_validator("storage_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        """``TUWEN_STORAGE_DIR=data/pictures`` means that folder under the one the process started in, once
        and for all: the absolute path is what child processes and logs see."""
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        """Refuse the example secrets of ``.env.example``: a deployment must set its own."""
        left = []
        if self.minio_endpoint and is_placeholder(self.minio_secret_key.get_secret_value()):
            left.append("TUWEN_MINIO_SECRET_KEY")
        for name, url in (("TUWEN_REDIS_URL", self.redis_url), ("TUWEN_BROKER_URL", self.broker_url)):
            if url and is_placeholder(urlsplit(url).password or ""):
                left.append(f"the password in {name}")
        if left:
            raise ValueError(f"{' and '.join(left)} still has an example value (such as change-me); "
                             "set a real secret (see .env.example)")
        return self

    @property
    def pool_threads(self) -> int:
        """The worker's Celery pool threads: a hand-over holds its thread until its last job is answered,
        and every running row may belong to a different hand-over, so ``max_batch_size`` threads can be
        waiting on the decode loop while ``worker_groups`` more prepare the next jobs. (With only
        ``worker_groups`` threads, four groups decoding left an interactive job buffered for 1.3–1.9 s.)"""
        return self.max_batch_size + self.worker_groups

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def replicas_ack(self) -> int:
        """``redis_replicas_ack`` as it applies: 1 with Sentinel unless set."""
        if self.redis_replicas_ack is not None:
            return self.redis_replicas_ack
        return 1 if sentinel.parse(self.redis_url) else 0

    def to_env(self) -> dict[str, str]:
        """These settings as ``TUWEN_*`` variables, for starting a worker process with the same view."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            if isinstance(self.__dict__[name], SecretStr):
                value = self.__dict__[name].get_secret_value()
            env["TUWEN_" + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return env
