"""The decode loop: a running batch that rows join and leave between steps (continuous batching).

On plain Hugging Face models, in the manner of TGI's ``CausalLMBatch`` (``concatenate`` / ``filter``):

* Rows that join are prefilled together (left-padded, with their pictures), which gives their
  ``DynamicCache`` and first logits. Their caches and attention masks are then left-padded to the
  running batch's length and concatenated along the batch dimension.
* Each decode step feeds every row its last token with explicit position ids: the row's count of real
  tokens so far, plus the row's M-RoPE offset for the Qwen-VL families (``rope_deltas``, which the
  model's own ``_prepare_position_ids_for_generation`` computes at prefill; 0 elsewhere).
* A finished row leaves at once: the last rows move into the holes it leaves, so a leave copies the
  moved rows only; padding columns no row needs any more are trimmed from the left once there are enough
  of them to pay for a copy of the cache.
* The cache keeps spare columns and spare rows (``workers.kvcache``): a decode step writes its keys and
  values into room already there, and rows that join are written below the running ones, instead of
  copying the whole cache (``DynamicLayer`` concatenates on every step, and joins and leaves used to copy
  the cache twice each: a quarter of a decode step at 64 rows, measured).
* A row may give way (``park``): it leaves with its part of the cache and comes back later where it
  left off (``unpark``, one copy of its cache, no prefill), so interactive rows decode in a small batch.
* Each row picks its token on its own: greedy (the default) or temperature / top-p sampling with the
  row's own seeded generator, so a seeded job gets the same answer whatever batch it lands in.
* A row that asks for ``n`` choices is prefilled once; its cache is then copied into ``n`` rows of the
  batch, each with its own generator (choice ``i`` seeded ``seed + i``), and the row finishes with its last
  choice. Rows that ask for ``logprobs`` keep each token's log probability (``engine.logprobs``).
* Text is detokenized incrementally per row and handed to the row's ``on_text`` callback; a delta never
  ends inside a multi-byte character or inside a possible stop string.

Greedy answers are token-identical to ``model.generate`` on the same row alone in fp32 (tested per
family in tests/workers/test_engine.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tuwen.workers.engine.kvcache import RoomyLayer, left_pad, roomy_cache, rows_of, stacked
from tuwen.workers.engine.logprobs import Entries, Step, measure
from tuwen.workers.engine.reuse import Prefill, Reuse

#: What a row's prompt inputs may hold besides ids and mask (the families' picture tensors).
_PICTURE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids", "pixel_values_videos",
                 "video_grid_thw")


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens (``GenerationParams``' knobs, the same names). ``temperature == 0`` is
    greedy; the penalties apply to greedy rows too."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: (token id, bias) pairs added to the row's logits at every step (OpenAI's ``logit_bias``).
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Choices: the row decodes as ``n`` rows from one prefill; choice ``i`` samples with ``seed + i``.
    n: int = 1
    #: Keep each token's log probability (and the ``top_logprobs`` likeliest alternatives): ``engine.logprobs``.
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def of(cls, params: Any) -> Sampling:
        """A job's sampling, every knob of its ``GenerationParams`` as it is."""
        knobs = {name: getattr(params, name) for name in cls.__dataclass_fields__}
        knobs["logit_bias"] = tuple(sorted((knobs["logit_bias"] or {}).items()))
        return cls(**knobs)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.logit_bias))


@dataclass(eq=False)
class Row:
    """One request for the engine: a rendered prompt, its pictures, and what to do with the text."""

    key: Any
    prompt: str
    images: list[Any] = field(default_factory=list)
    max_new_tokens: int = 64
    sampling: Sampling = Sampling()
    stop: Sequence[str] = ()
    #: End of sequence is not allowed before this many tokens (benchmarks force answer lengths).
    min_new_tokens: int = 0
    #: Called with each new piece of text as it is generated (streaming); never with an empty string. A row
    #: with ``n`` > 1 or ``logprobs`` also passes ``choice=`` (its index) and, with ``logprobs``, ``logprobs=``
    #: (OpenAI's entries of the tokens since the last call: the last call may carry only those).
    on_text: Callable[..., None] | None = None
    #: Makes the row's grammar constraint (``engine.grammar``), fresh each time the row starts; None: free.
    grammar: Callable[[], Any] | None = None
    #: Whose row this is: the encoder and prefix caches are per owner (``engine.reuse``).
    scope: str = ""
    #: The pictures' digests (``reuse.picture_digest``), made where the row is prepared; empty: made on join.
    digests: tuple[bytes, ...] = ()


@dataclass
class Finished:
    """A row that left the batch."""

    row: Row
    text: str
    tokens: list[int]
    finish_reason: str  #: ``stop`` (end of sequence or a stop string) or ``length``
    prompt_tokens: int
    #: Most rows that shared a decode step with this one.
    batch_size: int
    timings: dict[str, float]
    #: Why the row failed alone (its grammar constraint refused a step); ``finish_reason`` is then ``error``.
    error: str | None = None
    #: Which choice this is (``Sampling.n``), and each answer token's log probabilities (``Sampling.logprobs``).
    choice: int = 0
    steps: list[Step] | None = None
    #: Every choice of a row with ``n`` > 1 (this one is choice 0's), in order; empty for other rows.
    choices: list[Finished] = field(default_factory=list)


class _Choices:
    """The choices of one row with ``n`` > 1: each decodes as a row of its own, and the row finishes with its
    last choice (the engine hands out one ``Finished`` per ``Row``, whatever its ``n``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.done: dict[int, Finished] = {}
        #: Characters each finished choice had streamed (a row that starts over skips them).
        self.sent: dict[int, int] = {}

    def add(self, finished: Finished, sent: int) -> Finished | None:
        """Keep a finished choice; the whole row once its last choice is in."""
        self.done[finished.choice] = finished
        self.sent[finished.choice] = sent
        if len(self.done) < self.n:
            return None
        every = [self.done[i] for i in range(self.n)]
        first = every[0]
        return Finished(row=first.row, text=first.text, tokens=first.tokens, finish_reason=first.finish_reason,
                        prompt_tokens=first.prompt_tokens, batch_size=max(f.batch_size for f in every),
                        timings={"first_token_ms": min(f.timings["first_token_ms"] for f in every),
                                 "generate_ms": max(f.timings["generate_ms"] for f in every)},
                        error=next((f.error for f in every if f.error), None), steps=first.steps, choices=every)


class _Live:
    """A row inside the running batch: its tokens, sampler and incremental detokenizer state."""

    def __init__(self, row: Row, prompt_tokens: int, tokenizer: Any, joined: float,
                 prompt_ids: list[int] | None = None, choice: int = 0, family: _Choices | None = None) -> None:
        self.row = row
        self.choice = choice
        self.family = family
        self.prompt_tokens = prompt_tokens
        #: The prompt's token ids, kept only for a row with a repetition penalty.
        self.prompt_ids = prompt_ids or []
        self.tokens: list[int] = []
        self.text = ""  #: decoded text so far (stop strings cut off)
        self.sent = 0  #: characters already handed to on_text
        self._prefix = 0  #: incremental detokenization offsets (TGI's prefix_offset / read_offset)
        self._read = 0
        self.tokenizer = tokenizer
        self.joined = joined
        self.first_token_at: float | None = None
        self.batch_size = 0
        self.generator: torch.Generator | None = None
        if not row.sampling.greedy:
            self.generator = torch.Generator()
            if row.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(row.sampling.seed + choice)
        self.hold = max((len(s) for s in row.stop), default=1) - 1
        self.constraint = row.grammar() if row.grammar is not None else None
        self.error: str | None = None
        self.steps: list[Step] | None = [] if row.sampling.logprobs else None
        self._steps_sent = 0

    def push(self, token: int) -> str | None:
        """Take one generated token; returns the finish reason if the row is done."""
        self.tokens.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        prefix = self.tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        full = self.tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix):]
            self.text += piece if self.text else piece.lstrip()
            self._prefix, self._read = self._read, len(self.tokens)
        for stop in self.row.stop:
            at = self.text.find(stop)
            if stop and at >= 0:
                self.text = self.text[:at]
                return "stop"
        return None

    def flush(self, final: bool, entries: Entries | None = None) -> None:
        """Hand new text to the callback; hold back what could still become a stop string. With logprobs,
        the entries of the tokens since the last call go along (``entries`` makes them)."""
        if self.row.on_text is None:
            return
        upto = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        unsent = self.steps is not None and final and self._steps_sent < len(self.tokens)
        if upto <= self.sent and not unsent:
            return
        piece, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        if self.steps is None and self.row.sampling.n == 1:
            self.row.on_text(piece)
            return
        extra: dict[str, Any] = {"choice": self.choice}
        if self.steps is not None and entries is not None:
            extra["logprobs"] = entries(self.steps[self._steps_sent:len(self.tokens)])
            self._steps_sent = len(self.tokens)
        self.row.on_text(piece, **extra)


@dataclass
class Parked:
    """Rows out of the batch with their cache (``Engine.park``), to come back where they left off."""

    rows: list[_Live]
    cache: Any
    mask: torch.Tensor
    next_pos: torch.Tensor
    last: torch.Tensor

    def take(self, chosen: list[int]) -> Parked:
        """Rows ``chosen`` (indexes), with copies of their part of the cache."""
        index = torch.tensor(chosen, dtype=torch.long, device=self.mask.device)
        return Parked([self.rows[i] for i in chosen], rows_of(self.cache, index), self.mask[index],
                      self.next_pos[index], self.last[index])

    def split(self, count: int) -> tuple[Parked, Parked | None]:
        """The first ``count`` rows, and the rest (None if none is left)."""
        if count >= len(self.rows):
            return self, None
        return self.take(list(range(count))), self.take(list(range(count, len(self.rows))))


class Engine:
    """A running batch over one loaded model. Not thread-safe: one loop drives it."""

    def __init__(self, model: Any, processor: Any, eos_token_ids: set[int], pad_token_id: int,
                 reuse: Reuse | None = None) -> None:
        self.model = model
        #: The worker's encoder and prefix caches (``engine.reuse``); None: every row prefilled whole.
        self.reuse = reuse
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos = eos_token_ids
        self.pad = pad_token_id
        self.rows: list[_Live] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  #: (rows, columns) 1 = real token
        self._next_pos: torch.Tensor | None = None  #: (rows,) position id of each row's next token
        self._last: torch.Tensor | None = None  #: (rows, 1) each row's last token

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    # -- joining ----------------------------------------------------------------------------------
    def encode(self, rows: Sequence[Row]) -> Any:
        """The processor's left-padded batch for ``rows`` (pictures in prompt order)."""
        images = [img for r in rows for img in r.images]
        enc = self.processor(images=images or None, text=[r.prompt for r in rows], return_tensors="pt",
                             padding=True)
        enc = enc.to(self.model.device)
        if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc

    def add(self, rows: Sequence[Row], enc: Any | None = None) -> list[Finished]:
        """Prefill ``rows`` together and join them to the running batch. Returns rows that finished
        on their first token (end of sequence at once, or ``max_new_tokens == 1``). With reuse
        (``engine.reuse``) the rows may join in parts: those sharing a prefix, and the others."""
        if not rows:
            return []
        joined = time.perf_counter()
        enc = enc if enc is not None else self.encode(rows)
        inputs = dict(enc)
        mask = inputs["attention_mask"]
        positions = self.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
        deltas = getattr(getattr(self.model, "model", None), "rope_deltas", None)
        real = mask.sum(-1)
        next_pos = real + (deltas.view(-1).to(real.device) if deltas is not None and positions.ndim == 3 else 0)
        if self.reuse is not None and self.reuse.applies and any(r.images for r in rows):
            parts = Prefill(self.reuse, rows, inputs, positions).parts()
        else:
            kwargs = {k: inputs[k] for k in _PICTURE_KEYS if k in inputs}
            with torch.inference_mode():
                out = self.model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions,
                                 cache=roomy_cache(self.model.config), use_cache=True, logits_to_keep=1, **kwargs)
            parts = [(list(range(len(rows))), out.cache, out.logits[:, -1, :], mask)]
        finished = []
        for index, cache, logits, part_mask in parts:
            sel = torch.tensor(index, dtype=torch.long, device=mask.device)
            finished += self._enter([rows[i] for i in index], inputs["input_ids"][sel], mask[sel], joined, cache,
                                    logits, part_mask, next_pos[sel])
        return finished

    def _enter(self, rows: list[Row], ids: torch.Tensor, prompt_mask: torch.Tensor, joined: float, cache: Any,
               logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor) -> list[Finished]:
        """Rows prefilled (their cache, last logits and attention mask) join the batch and pick their first
        token. ``ids`` / ``prompt_mask``: their prompts as encoded."""
        real = prompt_mask.sum(-1)
        live = []
        for i, (r, n) in enumerate(zip(rows, real.tolist())):
            family = _Choices(r.sampling.n) if r.sampling.n > 1 else None
            prompt_ids = ids[i][prompt_mask[i].bool()].tolist() if r.sampling.repetition_penalty != 1.0 else None
            live += [_Live(r, int(n), self.tokenizer, joined, prompt_ids, c, family) for c in range(r.sampling.n)]
        if len(live) > len(rows):  # the choices of a row share its prefill: copies of its cache, not n prefills
            index = torch.repeat_interleave(torch.arange(len(rows), device=mask.device),
                                            torch.tensor([r.sampling.n for r in rows], device=mask.device))
            cache, logits, mask, next_pos = rows_of(cache, index), logits[index], mask[index], next_pos[index]
        self._join(live, cache, mask, next_pos)
        return self._advance(logits, first=len(live))

    def _join(self, live: list[_Live], cache: Any, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        if self._cache is None or not self.rows:
            self.rows, self._cache, self._mask, self._next_pos = live, cache, mask, next_pos
            self._last = torch.zeros((len(live), 1), dtype=torch.long, device=mask.device)
            return
        assert self._mask is not None and self._next_pos is not None and self._last is not None
        width = max(self.columns, int(mask.shape[1]))
        old_pad, new_pad = width - self.columns, width - int(mask.shape[1])
        rows = self.size + len(live)
        for old, new in zip(self._cache.layers, cache.layers):
            if isinstance(old, RoomyLayer) and not old_pad and old.append_rows(new.keys, new.values):
                continue
            room = (old.ROOM, RoomyLayer.row_room(rows)) if isinstance(old, RoomyLayer) else (0, 0)
            keys, values = (stacked(a, b, width, *room) for a, b in ((old.keys, new.keys), (old.values, new.values)))
            if isinstance(old, RoomyLayer):
                old.hold(keys, values, width, rows)
            else:
                old.keys, old.values = keys, values
        self._mask = torch.cat([left_pad(self._mask, old_pad, dim=1), left_pad(mask, new_pad, dim=1)], dim=0)
        self._next_pos = torch.cat([self._next_pos, next_pos])
        self._last = torch.cat([self._last, torch.zeros((len(live), 1), dtype=torch.long, device=mask.device)])
        self.rows = self.rows + live

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[Finished]:
        """One decode step for every running row; returns the rows that finished on it."""
        if not self.rows:
            return []
        assert self._mask is not None and self._next_pos is not None and self._last is not None
        ones = torch.ones((self.size, 1), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=self._last, attention_mask=self._mask,
                             position_ids=self._next_pos.view(-1, 1), cache=self._cache, use_cache=True)
        self._cache = out.cache
        self._next_pos = self._next_pos + 1
        return self._advance(out.logits[:, -1, :], first=0)

    def _advance(self, logits: torch.Tensor, first: int) -> list[Finished]:
        """Pick each row's next token (the last ``first`` rows just joined); drop finished rows."""
        offset = self.size - first if first else 0
        rows = self.rows[offset:]
        tokens = self._pick(logits.float(), rows)
        entries = Entries(self.tokenizer, logits.shape[-1]) if any(r.steps is not None for r in rows) else None
        assert self._last is not None
        self._last[offset:, 0] = torch.tensor(tokens, dtype=torch.long, device=self._last.device)
        done: list[tuple[int, str]] = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.batch_size = max(row.batch_size, self.size)
            if row.constraint is not None and row.error is None and token not in self.eos:
                _guarded(row, row.constraint.accept, token)
            reason = "error" if row.error else "stop" if token in self.eos else row.push(token)
            if reason is None and len(row.tokens) >= row.row.max_new_tokens:
                reason = "length"
            row.flush(reason is not None, entries)
            if reason is not None:
                done.append((offset + i, reason))
        return self._drop(done)

    def _pick(self, logits: torch.Tensor, rows: list[_Live]) -> list[int]:
        early = [i for i, row in enumerate(rows) if len(row.tokens) < row.row.min_new_tokens]
        penalized = [i for i, row in enumerate(rows) if row.row.sampling.penalized]
        constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
        if early or penalized or constrained:
            logits = logits.clone()
        if early:
            logits[torch.tensor(early)[:, None], torch.tensor(sorted(self.eos))[None, :]] = float("-inf")
        for i in penalized:
            _penalize(logits[i], rows[i])
        live = {i: rows[i].constraint for i in constrained if rows[i].error is None}
        if live:  # after the penalties: the grammar has the last word
            for i, exc in next(iter(live.values())).mask_batch(logits, live).items():
                rows[i].error = f"{type(exc).__name__}: {exc}"
        picked = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.generator is not None:
                picked[i] = _sample(logits[i], row.row.sampling, row.generator)
        asking = [i for i, row in enumerate(rows) if row.steps is not None]
        if asking:  # only the rows that asked pay for their log probabilities
            sampling = [rows[i].row.sampling for i in asking]
            steps = measure(logits[torch.tensor(asking, device=logits.device)],
                            [1.0 if s.greedy else max(s.temperature, 1e-5) for s in sampling],
                            [picked[i] for i in asking], [s.top_logprobs for s in sampling])
            for i, step in zip(asking, steps):
                rows[i].steps.append(step)  # type: ignore[union-attr]
        return picked

    def _drop(self, done: list[tuple[int, str]]) -> list[Finished]:
        if not done:
            return []
        now = time.perf_counter()
        finished = []
        for index, reason in done:
            live = self.rows[index]
            one = Finished(
                row=live.row, text=live.text, tokens=live.tokens, finish_reason=reason,
                prompt_tokens=live.prompt_tokens, batch_size=live.batch_size, error=live.error, choice=live.choice,
                steps=None if live.steps is None else live.steps[:len(live.tokens)],  # not the end of sequence's
                timings={"first_token_ms": round(((live.first_token_at or now) - live.joined) * 1000, 2),
                         "generate_ms": round((now - live.joined) * 1000, 2)})
            whole = one if live.family is None else live.family.add(one, live.sent)
            if whole is not None:
                finished.append(whole)
        self._remove({i for i, _ in done})
        return finished

    def _remove(self, gone: set[int]) -> None:
        """Take rows ``gone`` out of the batch: the last rows move into their holes."""
        left = self.size - len(gone)
        if not left:
            self.rows, self._cache, self._mask, self._next_pos, self._last = [], None, None, None, None
            return
        assert self._mask is not None and self._next_pos is not None and self._last is not None
        # The last rows fill the holes below ``left``: ``order[i]`` is the row that row i is now.
        holes = [i for i in sorted(gone) if i < left]
        movers = [j for j in range(left, self.size) if j not in gone]
        order = list(range(left))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        index = torch.tensor(order, dtype=torch.long, device=self._mask.device)
        for layer in self._cache.layers:
            if not (isinstance(layer, RoomyLayer) and layer.move_rows(holes, movers, left)):
                layer.batch_select_indices(index)
        self._mask, self._next_pos, self._last = self._mask[index], self._next_pos[index], self._last[index]
        self.rows = [self.rows[i] for i in order]
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if unused >= min(RoomyLayer.ROOM // 2, self.columns // 4 + 1):  # a copy of the cache pays for itself
            self._mask = self._mask[:, unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    # -- giving way -------------------------------------------------------------------------------
    def park(self, chosen: list[int]) -> Parked:
        """Take rows ``chosen`` (indexes) out of the batch, keeping their cache, mask, positions and last
        token: ``unpark`` brings them back where they left off (vLLM's preemption by swapping, here for
        latency, not memory: the cache stays where it is)."""
        assert self._mask is not None and self._next_pos is not None and self._last is not None
        chosen = sorted(chosen)
        parked = Parked(self.rows, self._cache, self._mask, self._next_pos, self._last).take(chosen)
        self._remove(set(chosen))
        return parked

    def unpark(self, parked: Parked) -> None:
        """Bring parked rows back into the batch (a copy of their cache; no prefill)."""
        self._join(parked.rows, parked.cache, parked.mask, parked.next_pos)
        assert self._last is not None
        self._last[self.size - len(parked.rows):] = parked.last

    def run(self, rows: Sequence[Row], enc: Any | None = None) -> list[Finished]:
        """Answer ``rows`` (a static batch): add them, step until all have finished."""
        finished = self.add(rows, enc)
        while self.rows:
            finished += self.step()
        order = {id(r): i for i, r in enumerate(rows)}
        return sorted(finished, key=lambda f: order[id(f.row)])


def _guarded(row: _Live, step: Callable[[Any], None], arg: Any) -> None:
    """Run one grammar step of ``row``; a failure fails this row alone (it leaves at this step)."""
    if row.error is not None:
        return
    try:
        step(arg)
    except Exception as exc:  # noqa: BLE001 - whatever the library raised, the row's batch-mates go on
        row.error = f"{type(exc).__name__}: {exc}"


def _penalize(logits: torch.Tensor, row: _Live) -> None:
    """A row's biases and penalties, in place on its logits: OpenAI's ``logit_bias``, repetition (Hugging
    Face's, over the prompt and the answer), then OpenAI's frequency and presence penalties over the answer."""
    s = row.row.sampling
    if s.logit_bias:
        ids, biases = zip(*s.logit_bias)
        logits[torch.tensor(ids, device=logits.device)] += torch.tensor(biases, dtype=logits.dtype,
                                                                        device=logits.device)
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.tokens)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if row.tokens and (s.frequency_penalty or s.presence_penalty):
        ids, counts = torch.tensor(row.tokens, dtype=torch.long).unique(return_counts=True)
        ids, counts = ids.to(logits.device), counts.to(logits.device, logits.dtype)
        logits[ids] -= s.frequency_penalty * counts + s.presence_penalty


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Temperature, top-k, min-p and nucleus (top-p) sampling for one row, with the row's own generator."""
    scaled = logits / max(sampling.temperature, 1e-5)
    if 0 < sampling.top_k < scaled.numel():
        kth = scaled.topk(sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampling.min_p > 0.0:
        probs = probs.masked_fill(probs < sampling.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
