"""The contract shared by producers and workers: job request and job result (frozen, JSON only)."""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from tuwen.pipeline import structured
from tuwen.pipeline.tool_format import ToolCallFormat

# -- limits, defined once (the gateway, the CLI and the workers import them) -------------------------
#: Most tokens one answer may ask for anywhere; a server's own cap is ``TUWEN_MAX_NEW_TOKENS`` (1024 unless
#: set), and the model's context bounds every answer.
MAX_NEW_TOKENS = 131_072
#: What a job id looks like (ids can be chosen by the caller: idempotency, bulk lines).
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
JOB_ID_MIN = 8
JOB_ID_MAX = 64
#: Longest URL accepted anywhere (webhook callbacks, remote pictures).
MAX_URL_CHARS = 2048
#: Most stop strings per job, and the longest one.
MAX_STOP = 4
MAX_LOGIT_BIAS = 300  #: OpenAI's limit on logit_bias entries
MAX_STOP_CHARS = 64
#: Most choices one job may ask for (``n``): each is a row of the batch with its own copy of the prompt's cache.
MAX_CHOICES = 8
#: Most alternatives per token with ``logprobs`` (``top_logprobs``), OpenAI's limit.
MAX_TOP_LOGPROBS = 20
#: Most turns in one conversation.
MAX_MESSAGES = 64


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    #: No record: never submitted, expired, or deleted. (Celery's PENDING cannot tell these apart.)
    unknown = "unknown"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Priority(str, Enum):
    interactive = "interactive"
    bulk = "bulk"


class Truncation(str, Enum):
    """What to do with a conversation longer than the model's context (less the answer's budget)."""

    #: Refuse it with ``context_too_long`` and the token counts.
    none = "none"
    #: Drop the oldest turns until it fits; never the system prompt, nor the last user turn and its pictures.
    oldest_turns = "oldest_turns"


class GenerationParams(BaseModel):
    """Per-job generation knobs. Unknown keys are refused, not ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Most tokens of the answer. None: what is left of the model's context after the prompt, up to the
    #: server's ``TUWEN_MAX_NEW_TOKENS``; more than that cap is refused, never lowered.
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    #: 0 is greedy (the default: answers are then the same batched or alone).
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    #: Nucleus sampling: keep the smallest set of tokens whose probabilities add up to this.
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    #: Sample among the ``top_k`` likeliest tokens only (0 or -1: all of them), as vLLM's ``top_k``.
    top_k: int = Field(0, ge=-1)
    #: Drop tokens less likely than ``min_p`` times the likeliest one (0: none), as vLLM's ``min_p``.
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    #: Divides positive (multiplies negative) logits of every token already in the prompt or the answer
    #: (1: off), as Hugging Face's and vLLM's ``repetition_penalty``; applies to greedy answers too.
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    #: OpenAI's penalties on the answer's own tokens: minus ``frequency_penalty`` per time a token was
    #: generated, minus ``presence_penalty`` once if it was (0: off).
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    #: OpenAI's ``logit_bias``: token id -> a bias from -100 to 100 added to its logit at every step, before
    #: the penalties and any ``response_format`` (at most 300 tokens; ids past the model's vocabulary fail).
    logit_bias: dict[Annotated[int, Field(ge=0, lt=2**31)], Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS)
    #: With sampling, the same seed gives the same answer whatever batch the job lands in. Choice ``i`` of a
    #: job with ``n`` > 1 samples with ``seed + i`` (as vLLM's parallel sampling): choice 0 is the answer of
    #: the same job with ``n`` = 1.
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    #: Answers (choices) to the same prompt, from one prefill; greedy choices are all the same.
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    #: Return each answer token's log probability, after the row's processors (penalties, ``logit_bias``,
    #: ``response_format``, temperature), and with ``top_logprobs`` the likeliest alternatives at each step.
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    #: The answer ends before the first of these strings (which is not part of it).
    stop: tuple[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)], ...] = Field((), max_length=MAX_STOP)
    truncation: Truncation = Truncation.none
    #: OpenAI's ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
    #: {"name", "schema", "strict"}}`` constrain the answer to JSON (docs/structured.md); None is free text.
    response_format: dict[str, Any] | None = Field(None, examples=[{"type": "json_object"}])
    #: ``tools`` with ``tool_choice`` "required" or a named function: the answer is one call of one of the
    #: functions, its arguments valid against its parameters (``tool_format``, docs/structured.md).
    tool_call: ToolCallFormat | None = None

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value: Any) -> dict[str, Any] | None:
        return structured.checked(value)

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationParams:
        if self.tool_call is not None and self.response_format is not None:
            raise ValueError("a forced tool call and a response_format cannot both constrain one answer")
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["text"] = "text"
    text: str


class ImagePart(BaseModel):
    """A picture already in the image store, by key (never bytes in a message)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["image"] = "image"
    key: str = Field(min_length=1, max_length=512)


class AudioPart(BaseModel):
    """A spoken question already in the store, by key; the speech stage puts its transcript in its place."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["audio"] = "audio"
    key: str = Field(min_length=1, max_length=512)


Part = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class StageName(str, Enum):
    """The stages a job goes through: ``speech`` (audio questions only, on ``TUWEN_SPEECH_QUEUE``), ``picture``."""

    speech = "speech"
    picture = "picture"


class Stage(BaseModel):
    """One stage a job went through: where, with which model, when, and its timings in milliseconds."""

    model_config = ConfigDict(frozen=True)

    name: StageName
    model_id: str | None = None
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class Role(str, Enum):
    system = "system"
    user = "user"
    assistant = "assistant"


class Message(BaseModel):
    """One turn of a conversation: text and picture parts, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    role: Role
    #: May be empty (OpenAI takes empty and null content).
    content: tuple[Part, ...] = ()

    @property
    def image_keys(self) -> list[str]:
        return [p.key for p in self.content if isinstance(p, ImagePart)]

    @property
    def audio_keys(self) -> list[str]:
        return [p.key for p in self.content if isinstance(p, AudioPart)]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    retryable: bool = False
    #: The stage that failed, for a job with a spoken question (``speech`` or ``picture``).
    stage: StageName | None = None

    @classmethod
    def of(cls, code: str, message: str) -> ErrorInfo:
        """An error with the catalogue's ``retryable`` for its code (``errors.ErrorCode``)."""
        from tuwen.pipeline.errors import ErrorCode

        member = ErrorCode._value2member_map_.get(code)
        return cls(code=code, message=message, retryable=bool(getattr(member, "retryable", False)))


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobRequest(BaseModel):
    """What a worker needs to answer one job: a conversation whose pictures are image *keys*, never bytes.

    A single question about one picture is a one-turn conversation; ``JobRequest(image_key=…,
    question=…)`` builds it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=new_job_id, min_length=JOB_ID_MIN, max_length=JOB_ID_MAX, pattern=JOB_ID_PATTERN)
    messages: tuple[Message, ...] = Field(min_length=1, max_length=MAX_MESSAGES)
    params: GenerationParams = GenerationParams()
    priority: Priority = Priority.interactive
    owner: str = Field("default", min_length=1, max_length=128)
    created_at: float = Field(default_factory=time.time)
    #: Set for jobs that belong to a bulk. (Read as ``batch_id`` too: messages and job records written
    #: before bulks were called bulks must still validate.)
    bulk_id: str | None = Field(None, validation_alias=AliasChoices("bulk_id", "batch_id"))
    #: Publish the answer's text as it is generated (for streaming clients).
    stream: bool = False
    #: A job of the speech stage alone: its answer is the transcript (``POST /v1/audio/transcriptions``).
    transcribe_only: bool = False
    #: Set by the speech stage when it hands the job on: what it heard, and the stages done so far.
    transcript: str | None = None
    stages: tuple[Stage, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _one_question(cls, data: Any) -> Any:
        """``image_key`` + ``question`` is shorthand for a one-turn conversation."""
        if isinstance(data, dict) and "messages" not in data and ("image_key" in data or "question" in data):
            data = dict(data)
            key, question = data.pop("image_key", None), data.pop("question", None)
            content: list[dict[str, Any]] = [{"type": "image", "key": key}] if key is not None else []
            data["messages"] = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
        return data

    @model_validator(mode="after")
    def _shape(self) -> JobRequest:
        if not any(m.content for m in self.messages):
            raise ValueError("the conversation has neither text nor pictures")
        if self.transcribe_only and len(self.audio_keys) != 1:
            raise ValueError("a transcription job has exactly one audio part")
        if any(m.audio_keys for m in self.messages if m.role != Role.user):
            raise ValueError("audio belongs in user messages")
        return self

    @property
    def audio_keys(self) -> list[str]:
        """Every spoken part of the conversation, in order (none once the speech stage has handed it on)."""
        return [key for m in self.messages for key in m.audio_keys]

    @property
    def stage(self) -> StageName:
        """The stage the job is for: ``speech`` while it holds audio, then ``picture``."""
        return StageName.speech if self.audio_keys else StageName.picture

    @property
    def continues(self) -> bool:
        """The conversation ends with an assistant message, which the answer continues (a prefill)."""
        return self.messages[-1].role == Role.assistant

    @property
    def image_keys(self) -> list[str]:
        """Every picture of the conversation, in order."""
        return [key for m in self.messages for key in m.image_keys]

    @property
    def image_key(self) -> str | None:
        """The first picture (a one-picture job's picture)."""
        keys = self.image_keys
        return keys[0] if keys else None

    @property
    def question(self) -> str:
        """The last user turn's text ("" when there is none)."""
        return next((m.text for m in reversed(self.messages) if m.role == Role.user), "")


class TopLogprob(BaseModel):
    """One token's log probability, in OpenAI's shape: its text, and its exact bytes (a token may hold part of
    a character: its ``token`` then shows U+FFFD where ``bytes`` holds the part)."""

    model_config = ConfigDict(frozen=True)

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """An answer token's log probability and the likeliest alternatives at its step (``top_logprobs``)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceResult(BaseModel):
    """One answer of a job with ``n`` > 1 or ``logprobs`` (``JobResult.choices``)."""

    model_config = ConfigDict(frozen=True)

    index: int
    answer: str
    finish_reason: str | None = None
    generated_tokens: int = 0
    #: One entry per answer token, when the job asked for ``logprobs``.
    logprobs: list[TokenLogprob] | None = None


class JobResult(BaseModel):
    """A job's state as the submitter sees it; terminal ones carry an answer or an error."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: JobStatus
    answer: str | None = None
    error: ErrorInfo | None = None
    model_id: str | None = None
    batch_size: int | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    attempts: int = 0
    worker: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    #: Milliseconds spent per stage (queue wait, image fetch, model, total …).
    timings: dict[str, float] = Field(default_factory=dict)
    owner: str | None = None
    image_key: str | None = None
    #: Why the answer ended: ``stop`` (the model ended it, or a stop string) or ``length`` (token budget).
    finish_reason: str | None = None
    #: Every answer of a job that asked for ``n`` > 1 or ``logprobs``, in order; ``answer`` and ``finish_reason``
    #: are choice 0's, ``generated_tokens`` counts the tokens of them all. None for other jobs.
    choices: list[ChoiceResult] | None = None
    #: Answered from the answer cache, without a model call.
    cached: bool = False
    #: Someone asked to cancel the job while it was running; it finished anyway.
    cancel_requested: bool = False
    #: A spoken question's transcript (the speech stage's output).
    transcript: str | None = None
    #: The stage a job with a spoken question is in (while it runs) or ended in.
    stage: StageName | None = None
    #: The stages a job with a spoken question went through, each with its timings (none for typed questions).
    stages: list[Stage] | None = None

    @classmethod
    def unknown(cls, job_id: str) -> JobResult:
        return cls(id=job_id, status=JobStatus.unknown)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# -- the job as its owner sees it (GET /v1/jobs/{id} and webhook bodies) ------------------------------
#: ``JobResult`` fields only tuwen sees: never shown to the job's owner, never documented.
PRIVATE_FIELDS = frozenset({"owner", "image_key", "worker"})


class WebhookView(BaseModel):
    """A job's webhook delivery, as the job's owner sees it."""

    model_config = ConfigDict(frozen=True)

    url: str
    #: pending (job running) · retrying · delivered · failed (gave up) · refused (SSRF guard) · expired
    state: str
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    delivered_at: float | None = None
    created_at: float | None = None


class JobView(JobResult):
    """The one public job model: ``JobResult`` without ``PRIVATE_FIELDS``, plus ``webhook`` and
    ``warning``. A webhook body is ``JobView.of(result).to_json()``; derived, so a field added to the
    result shows on GET and in the webhook alike."""

    model_config = ConfigDict(frozen=True, json_schema_extra={"examples": [{
        "id": "5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60", "status": "succeeded", "answer": "图中有3个圆形。",
        "model_id": "tuwen-demo", "batch_size": 4, "attempts": 1, "created_at": 1790000000.0,
        "finished_at": 1790000000.8, "timings": {"queue_ms": 120.5, "model_ms": 310.2, "total_ms": 812.0},
        "cached": False, "cancel_requested": False,
        "webhook": {"url": "https://hooks.example.com/tuwen", "state": "delivered", "attempts": 1,
                    "last_status": 200}}]})
    owner: SkipJsonSchema[str | None] = Field(None, exclude=True)
    image_key: SkipJsonSchema[str | None] = Field(None, exclude=True)
    worker: SkipJsonSchema[str | None] = Field(None, exclude=True)
    webhook: WebhookView | None = None
    #: Why a long-poll ended without an answer, when it can be told: "no live worker is consuming <queue>".
    warning: str | None = None

    @classmethod
    def of(cls, result: JobResult, **extra: Any) -> JobView:
        """``result`` as its owner sees it; ``extra`` sets ``webhook``, ``warning`` or ``cancel_requested``."""
        return cls(**{**result.model_dump(exclude=set(PRIVATE_FIELDS)), **extra})
