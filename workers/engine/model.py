"""The model runtime: one object that owns a loaded vision-language model and answers batches.

Generic Hugging Face path only (``AutoProcessor`` + ``AutoModelForImageTextToText`` + the
processor's chat template), so any llava-hf, LLaVA-NeXT or Qwen-VL checkpoint directory works.
Batches are left-padded and decoded greedily, so a batched answer is token-identical to the same
item answered alone (fp32). Bad items fail alone with a code; out-of-memory splits the batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from tuwen.pipeline.errors import InvalidInput, ModelError, OutOfMemory, TuwenError
from tuwen.pipeline.inputs import check_question, decode_image
from tuwen.pipeline.settings import CpuLinear, DType, Quantization, Settings
from tuwen.workers.engine import packed
from tuwen.workers.engine.batch import Engine, Row, Sampling
from tuwen.workers.engine.families import apply_image_limits, family_max_images, picture_side
from tuwen.workers.engine.logprobs import Entries
from tuwen.workers.engine.prompts import Prompt, Prompts
from tuwen.workers.engine.reuse import Reuse, picture_digest
from tuwen.workers.engine.requests import Answer, Group, Item, Prepared

log = logging.getLogger(__name__)

#: Module names kept in full precision under quantization: vision encoders and projectors are
#: small and sensitive; quantizing them costs accuracy and saves little memory. transformers 5
#: matches a name only at the start of a module path or as its suffix, so each is also given as
#: a pattern that finds it anywhere (``model.vision_tower.encoder...``).
_SKIP_NAMES = ["vision_tower", "visual", "vision_model", "multi_modal_projector", "merger", "lm_head"]
_SKIP_QUANT = _SKIP_NAMES + [rf".*\.{name}" for name in _SKIP_NAMES]


class Runtime:
    """Owns one model. Loads lazily on first use; ``answer_batch`` is the only hot path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.model_path is None:  # the edges (the worker command, the demo, the bench) choose a default
            raise ModelError("no checkpoint: set TUWEN_MODEL_PATH (or --model-path)", code="model_not_found")
        self.model_path = Path(settings.model_path)
        self._model: Any = None
        self._processor: Any = None
        self.load_seconds: float | None = None
        #: Drill hook, called with the batch size right before the model runs on a batch: raise
        #: ``torch.OutOfMemoryError`` from it to drill the split-and-retry path (``workers.hooks``).
        self.before_generate: Callable[[int], None] | None = None
        #: Benchmarks only: force this many new tokens (decode-bound measurements).
        self.min_new_tokens = 0
        #: The grammar compiler for constrained answers (``engine.grammar``), made on the first one.
        self.grammars: Any = None

    # -- loading ---------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The checkpoint's name plus a short digest of its config, for results and cache keys."""
        config = self.model_path / "config.json"
        digest = hashlib.sha256(config.read_bytes() if config.exists() else b"").hexdigest()[:8]
        return f"{self.model_path.name}@{digest}:{self.settings.quantization.value}"

    @property
    def device(self) -> str:
        if self.settings.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.settings.device

    def torch_dtype(self) -> Any:
        if self.settings.dtype == DType.auto:
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.settings.dtype.value)

    def quantization_config(self) -> Any:
        """The one ``BitsAndBytesConfig`` for the configured quantization, or None."""
        q = self.settings.quantization
        if q == Quantization.none:
            return None
        if q == Quantization.int8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_SKIP_QUANT)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=self.torch_dtype(),
            llm_int8_skip_modules=_SKIP_QUANT,
        )

    def load(self) -> None:
        """Load processor and model (idempotent)."""
        if self._model is not None:
            return
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if not (self.model_path / "config.json").exists():
            raise ModelError(f"no checkpoint at {self.model_path} (config.json missing)", code="model_not_found")
        t0 = time.perf_counter()
        processor = AutoProcessor.from_pretrained(self.model_path)
        processor.tokenizer.padding_side = "left"
        apply_image_limits(processor, self.settings)
        quant = self.quantization_config()
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype()}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map={"": self.device})
        model = AutoModelForImageTextToText.from_pretrained(self.model_path, **kwargs)
        if quant is None:
            model.to(self.device)
        model.eval()
        if quant is None and self.device == "cpu" and self.settings.cpu_linear == CpuLinear.onednn:
            log.info("packed %d linear layers for oneDNN", packed.pack(model))
        self._processor, self._model = processor, model
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s on %s in %.2fs", self.model_id, self.device, self.load_seconds)

    @property
    def processor(self) -> Any:
        self.load()
        return self._processor

    @property
    def model(self) -> Any:
        self.load()
        return self._model

    # -- answering ---------------------------------------------------------------------------------
    def answer_batch(self, items: Sequence[Item]) -> list[Answer]:
        """One ``Answer`` per item, in order (a static batch). Never raises for a bad item."""
        group = self.prepare(items)
        if group.rows:
            self._generate_split(group.rows, group.enc, group.answers)
        return group.answers

    def prepare(self, items: Sequence[Item]) -> Group:
        """Validate, decode and encode ``items`` for the engine. Bad items get their error answer at once
        (bad picture, too many pictures, context too long); the rest become engine rows keyed by index."""
        self.load()
        t0 = time.perf_counter()
        answers: list[Answer] = [Answer() for _ in items]
        ready: list[Prepared] = []
        for i, item in enumerate(items):
            try:
                ready.append(self._prepare(i, item))
            except Exception as exc:  # noqa: BLE001 - a bad item fails alone, whatever it raised
                answers[i].error = _refusal(exc)
        rows, enc = self._fit(ready, answers, self.engine()) if ready else ([], None)
        prep_ms = round((time.perf_counter() - t0) * 1000, 2)
        for a in answers:
            a.timings["preprocess_ms"] = prep_ms
        return Group(answers, rows, enc)

    def finish(self, group: Group, f: Any) -> Answer:
        """Fill in (and return) the answer of a finished engine row."""
        answer = group.answers[f.row.key]
        if f.error is not None:
            answer.error = TuwenError(f"the grammar of this job's response_format failed on it: {f.error}",
                                      code="constraint_failed").as_error()
            return answer
        every = f.choices or [f]
        answer.answer, answer.tokens, answer.finish_reason = f.text, f.tokens, f.finish_reason
        answer.prompt_tokens, answer.batch_size = f.prompt_tokens, f.batch_size
        answer.generated_tokens = sum(len(c.tokens) for c in every)
        answer.timings.update(f.timings)
        if f.choices or f.steps is not None:
            entries = Entries(self.processor.tokenizer, self.vocab_size) if f.steps is not None else None
            answer.choices = [{"index": c.choice, "answer": c.text, "finish_reason": c.finish_reason,
                               "generated_tokens": len(c.tokens),
                               **({"logprobs": entries(c.steps)} if entries and c.steps is not None else {})}
                              for c in every]
        return answer

    def _prepare(self, index: int, item: Item) -> Prepared:
        s = self.settings
        messages, pictures = item.conversation()
        if len(pictures) > self.max_images:
            raise InvalidInput(f"{len(pictures)} pictures in one job; this model takes at most {self.max_images}",
                               code="too_many_images")
        images = [p if isinstance(p, Image.Image) else decode_image(
            p, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, max_aspect_ratio=s.max_aspect_ratio)
            for p in pictures]
        if not item.messages:
            messages[-1]["content"][-1]["text"] = check_question(item.question, max_chars=s.max_conversation_chars)
        if item.max_new_tokens is not None and item.max_new_tokens > s.max_new_tokens:
            raise InvalidInput(f"max_tokens is {item.max_new_tokens}, above this worker's cap of {s.max_new_tokens} "
                               "tokens an answer (TUWEN_MAX_NEW_TOKENS)", code="invalid_params")
        return Prepared(index, messages, [img.convert("RGB") for img in images], item.max_new_tokens, item)

    @cached_property
    def max_images(self) -> int:
        """Most pictures one job may carry: the family's limit, lowered by ``TUWEN_MAX_IMAGES_PER_JOB``."""
        return min(family_max_images(self.model.config), self.settings.max_images_per_job)

    @cached_property
    def picture_side(self) -> int | None:
        """The long side the processor brings a picture to (``families.picture_side``): announced, so that PDF
        pages are rendered at the size the model sees."""
        return picture_side(self.processor)

    @property
    def renders_tools(self) -> bool:
        """The checkpoint's chat template renders tools (``Prompts.renders_tools``): announced, so the gateway
        knows whether ``tool_choice: "auto"`` could be served."""
        return self.prompts.renders_tools

    @cached_property
    def vocab_size(self) -> int:
        """Rows of the model's output head: the token ids its logits cover."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @cached_property
    def context_length(self) -> int:
        """The language model's context, in tokens."""
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        return int(getattr(text, "max_position_embeddings", 0) or self.processor.tokenizer.model_max_length)

    @cached_property
    def prompts(self) -> Prompts:
        """How conversations become prompts for this model (client text never becomes a special token)."""
        return Prompts(self.processor)

    def _generate_split(self, rows: list[Any], enc: Any, answers: list[Answer]) -> None:
        """Generate for ``rows``; on out-of-memory free the cache and retry each half."""
        group = Group(answers, rows, enc)
        try:
            if self.before_generate is not None:
                self.before_generate(len(rows))
            for f in self.engine().run(rows, enc):
                self.finish(group, f)
        except torch.OutOfMemoryError:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(rows) == 1:
                answers[rows[0].key].error = OutOfMemory("the model ran out of memory on this single item").as_error()
                return
            log.warning("out of memory on a batch of %d; retrying halves", len(rows))
            half = len(rows) // 2
            for part in (rows[:half], rows[half:]):
                self._generate_split(part, self.engine().encode(part), answers)

    def messages(self, question: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def engine(self) -> Any:
        """A fresh decode engine over the loaded model (``workers.engine``), with the worker's caches."""
        model, tok = self.model, self.processor.tokenizer
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tok.eos_token_id
        return Engine(model, self.processor, set(eos if isinstance(eos, list) else [eos]), tok.pad_token_id,
                      reuse=self.reuse)

    @cached_property
    def reuse(self) -> Reuse | None:
        """The encoder and prefix caches (``engine.reuse``), one per loaded model; None with
        ``TUWEN_PREFIX_REUSE=0`` or for a model they do not apply to."""
        s = self.settings
        if not s.prefix_reuse:
            return None
        reuse = Reuse(self.model, s.encoder_cache_mb << 20, s.prefix_cache_mb << 20)
        return reuse if reuse.applies else None

    def _row(self, p: Prepared) -> tuple[Any, Prompt]:
        biased = [token for token, _ in (p.item.sampling.logit_bias if p.item.sampling else ())]
        if biased and max(biased) >= self.vocab_size:
            raise InvalidInput(f"logit_bias names token {max(biased)}; this model's vocabulary has {self.vocab_size} "
                               "tokens", code="invalid_params")
        prompt = self.prompts.render(p.messages, continue_final=p.item.continue_final)
        self.prompts.check(prompt, len(p.images))
        row = Row(key=p.index, prompt=prompt.text, images=p.images, max_new_tokens=p.max_new_tokens or 1,
                  sampling=p.item.sampling or Sampling(), stop=p.item.stop, on_text=p.item.on_text,
                  grammar=self.grammar(p.item.response_format), scope=p.item.owner,
                  digests=tuple(picture_digest(img) for img in p.images) if self.reuse is not None else ())
        return row, prompt

    def grammar(self, response_format: dict[str, Any] | None) -> Any:
        """The row's grammar (``engine.grammar``), compiled once per format and model; None for free text."""
        if response_format is None or response_format.get("type", "text") == "text":
            return None
        if self.grammars is None:
            from tuwen.workers.engine.grammar import Grammars

            self.grammars = Grammars(self.processor.tokenizer, self.vocab_size)
        try:
            return self.grammars.factory(response_format)
        except ValueError as exc:
            raise InvalidInput(f"the response_format's schema cannot be enforced: {exc}",
                               code="invalid_schema") from None

    def _budget(self, p: Prepared, prompt_tokens: int) -> int:
        """The row's answer budget: as asked, or what is left of the context up to the server's cap (0: no
        room left)."""
        if p.max_new_tokens is not None:
            return p.max_new_tokens
        return max(0, min(self.settings.max_new_tokens, self.context_length - prompt_tokens))

    def _fit(self, batch: list[Prepared], answers: list[Answer], engine: Any) -> tuple[list[Any], Any]:
        """Rows and their encoding, every row within the context: a conversation that is too long is
        shortened (``truncation: oldest_turns``) or refused with ``context_too_long``. A row that cannot be
        encoded, or whose encoding holds other special tokens than its template wrote, fails alone."""
        while True:
            rows, prompts = [], []
            for p in list(batch):
                try:
                    row, prompt = self._row(p)
                except Exception as exc:  # noqa: BLE001 - this item alone fails
                    answers[p.index].error = _refusal(exc)
                    batch.remove(p)
                    continue
                rows.append(row)
                prompts.append(prompt)
            if not rows:
                return [], None
            try:
                enc = engine.encode(rows)
            except Exception:  # noqa: BLE001 - find the items at fault: each is encoded alone
                log.exception("encoding a group of %d failed; encoding each alone", len(rows))
                batch = self._encodable(batch, rows, answers, engine)
                continue
            wrong = self._wrong_specials(enc, prompts)
            if wrong:
                for i in wrong:
                    answers[batch[i].index].error = _refusal(wrong[i])
                batch = [p for i, p in enumerate(batch) if i not in wrong]
                continue
            lengths = enc["attention_mask"].sum(-1).tolist()
            budgets = [self._budget(p, n) for p, n in zip(batch, lengths)]
            over = [(p, n, b) for p, n, b in zip(batch, lengths, budgets) if not b or n + b > self.context_length]
            if not over:
                for row, budget in zip(rows, budgets):
                    row.max_new_tokens, row.min_new_tokens = budget, min(self.min_new_tokens, budget)
                return rows, enc
            for p, n, budget in over:
                if p.item.truncation == "oldest_turns" and _drop_oldest_turn(p):
                    continue
                asked = (f"with max_tokens {budget} it needs {n + budget}" if budget
                         else "it leaves no room for an answer")
                answers[p.index].error = InvalidInput(
                    f"the conversation is {n} tokens; {asked}, more than the model's context of "
                    f"{self.context_length} tokens", code="context_too_long").as_error()
                batch = [q for q in batch if q is not p]

    def _encodable(self, batch: list[Prepared], rows: list[Any], answers: list[Answer],
                   engine: Any) -> list[Prepared]:
        """The items of a group that failed to encode that encode alone; the others get their error."""
        kept = []
        for p, row in zip(batch, rows):
            try:
                engine.encode([row])
            except Exception as exc:  # noqa: BLE001 - this item alone fails
                answers[p.index].error = _refusal(exc)
                continue
            kept.append(p)
        return kept

    def _wrong_specials(self, enc: Any, prompts: list[Prompt]) -> dict[int, Exception]:
        """Rows whose token ids hold other special tokens than their template wrote (``Prompts.wrong_ids``)."""
        wrong: dict[int, Exception] = {}
        for i, (ids, mask, prompt) in enumerate(zip(enc["input_ids"], enc["attention_mask"], prompts)):
            why = self.prompts.wrong_ids(prompt, ids[mask.bool()].tolist())
            if why is not None:
                wrong[i] = InvalidInput(why, code="unprocessable_input")
        return wrong


def _refusal(exc: Exception) -> dict[str, Any]:
    """The error of one item that failed while it was prepared: its own code, or ``unprocessable_input``
    for anything unexpected (logged with its traceback)."""
    if isinstance(exc, TuwenError):
        return exc.as_error()
    log.error("preparing one item failed", exc_info=exc)
    return InvalidInput(f"this job's input could not be made ready for the model ({type(exc).__name__}: {exc})",
                        code="unprocessable_input").as_error()


def _drop_oldest_turn(p: Prepared) -> bool:
    """Drop the oldest turn after the system prompt (and that turn's pictures); never the last user turn.
    Returns False when nothing more can go."""
    first = 1 if p.messages and p.messages[0]["role"] == "system" else 0
    last_user = max((i for i, m in enumerate(p.messages) if m["role"] == "user"), default=-1)
    if first >= last_user:
        return False
    gone = p.messages.pop(first)
    content = gone["content"] if isinstance(gone["content"], list) else []
    skip = sum(1 for m in p.messages[:first] for part in (m["content"] if isinstance(m["content"], list) else [])
               if part.get("type") == "image")
    for _ in range(sum(1 for part in content if part.get("type") == "image")):
        p.images.pop(skip)
    return True


class NullRuntime(Runtime):
    """No model: every item gets an empty answer at once. Measures the queue, storage and job store alone
    (the benchmark's transport row; ``TUWEN_HOOK_NULL_MODEL``)."""

    @property
    def model_id(self) -> str:
        return "null"

    @property
    def device(self) -> str:
        return "cpu"

    def load(self) -> None:
        self.load_seconds = 0.0

    @property
    def max_images(self) -> int:  # type: ignore[override]
        return self.settings.max_images_per_job

    @property
    def renders_tools(self) -> bool:
        return False

    @property
    def picture_side(self) -> int | None:  # type: ignore[override]
        return None

    def engine(self) -> Any:
        return _NoEngine()

    def prepare(self, items: Sequence[Item]) -> Group:
        return Group([Answer(answer="", batch_size=len(items), finish_reason="stop") for _ in items], [], None)

    def answer_batch(self, items: Sequence[Item]) -> list[Answer]:
        return self.prepare(items).answers


class _NoEngine:
    """The null runtime's decode loop: never holds a row."""

    size = 0
    rows: list[Any] = []

    def step(self) -> list[Any]:
        return []
