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
* The cache keeps spare columns and spare rows (``_RoomyLayer``): a decode step writes its keys and
  values into room already there, and rows that join are written below the running ones, instead of
  copying the whole cache (``DynamicLayer`` concatenates on every step, and joins and leaves used to copy
  the cache twice each: a quarter of a decode step at 64 rows, measured).
* Each row picks its token on its own: greedy (the default) or temperature / top-p sampling with the
  row's own seeded generator, so a seeded job gets the same answer whatever batch it lands in.
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
from transformers.cache_utils import DynamicCache, DynamicLayer

#: What a row's prompt inputs may hold besides ids and mask (the families' picture tensors).
_PICTURE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids", "pixel_values_videos",
                 "video_grid_thw")


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


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
    #: Called with each new piece of text as it is generated (streaming); never with an empty string.
    on_text: Callable[[str], None] | None = None


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


class _Live:
    """A row inside the running batch: its tokens, sampler and incremental detokenizer state."""

    def __init__(self, row: Row, prompt_tokens: int, tokenizer: Any, joined: float) -> None:
        self.row = row
        self.prompt_tokens = prompt_tokens
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
                self.generator.manual_seed(row.sampling.seed)
        self.hold = max((len(s) for s in row.stop), default=1) - 1

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

    def flush(self, final: bool) -> None:
        """Hand new text to the callback; hold back what could still become a stop string."""
        if self.row.on_text is None:
            return
        upto = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        if upto > self.sent:
            self.row.on_text(self.text[self.sent:upto])
            self.sent = upto


class Engine:
    """A running batch over one loaded model. Not thread-safe: one loop drives it."""

    def __init__(self, model: Any, processor: Any, eos_token_ids: set[int], pad_token_id: int) -> None:
        self.model = model
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
        on their first token (end of sequence at once, or ``max_new_tokens == 1``)."""
        if not rows:
            return []
        joined = time.perf_counter()
        enc = enc if enc is not None else self.encode(rows)
        inputs = dict(enc)
        mask = inputs["attention_mask"]
        kwargs = {k: inputs[k] for k in _PICTURE_KEYS if k in inputs}
        positions = self.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
        with torch.inference_mode():
            out = self.model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions,
                             cache=_roomy_cache(self.model.config), use_cache=True, logits_to_keep=1, **kwargs)
        deltas = getattr(getattr(self.model, "model", None), "rope_deltas", None)
        real = mask.sum(-1)
        next_pos = real + (deltas.view(-1).to(real.device) if deltas is not None and positions.ndim == 3 else 0)
        live = [_Live(r, int(n), self.tokenizer, joined) for r, n in zip(rows, real.tolist())]
        self._join(live, out.cache, mask, next_pos)
        logits = out.logits[:, -1, :]
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
            if isinstance(old, _RoomyLayer) and not old_pad and old.append_rows(new.keys, new.values):
                continue
            room = (old.ROOM, _RoomyLayer.row_room(rows)) if isinstance(old, _RoomyLayer) else (0, 0)
            keys, values = (_stacked(a, b, width, *room) for a, b in ((old.keys, new.keys), (old.values, new.values)))
            if isinstance(old, _RoomyLayer):
                old.hold(keys, values, width, rows)
            else:
                old.keys, old.values = keys, values
        self._mask = torch.cat([_left_pad(self._mask, old_pad, dim=1), _left_pad(mask, new_pad, dim=1)], dim=0)
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
        assert self._last is not None
        self._last[offset:, 0] = torch.tensor(tokens, dtype=torch.long, device=self._last.device)
        done: list[tuple[int, str]] = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.batch_size = max(row.batch_size, self.size)
            reason = "stop" if token in self.eos else row.push(token)
            if reason is None and len(row.tokens) >= row.row.max_new_tokens:
                reason = "length"
            row.flush(final=reason is not None)
            if reason is not None:
                done.append((offset + i, reason))
        return self._drop(done)

    def _pick(self, logits: torch.Tensor, rows: list[_Live]) -> list[int]:
        early = [i for i, row in enumerate(rows) if len(row.tokens) < row.row.min_new_tokens]
        if early:
            logits = logits.clone()
            logits[torch.tensor(early)[:, None], torch.tensor(sorted(self.eos))[None, :]] = float("-inf")
        picked = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.generator is not None:
                picked[i] = _sample(logits[i], row.row.sampling, row.generator)
        return picked

    def _drop(self, done: list[tuple[int, str]]) -> list[Finished]:
        if not done:
            return []
        now = time.perf_counter()
        finished = []
        for index, reason in done:
            live = self.rows[index]
            finished.append(Finished(
                row=live.row, text=live.text, tokens=live.tokens, finish_reason=reason,
                prompt_tokens=live.prompt_tokens, batch_size=live.batch_size,
                timings={"first_token_ms": round(((live.first_token_at or now) - live.joined) * 1000, 2),
                         "generate_ms": round((now - live.joined) * 1000, 2)}))
        gone = {i for i, _ in done}
        left = self.size - len(gone)
        if not left:
            self.rows, self._cache, self._mask, self._next_pos, self._last = [], None, None, None, None
            return finished
        assert self._mask is not None and self._next_pos is not None and self._last is not None
        # The last rows fill the holes below ``left``: ``order[i]`` is the row that row i is now.
        holes = [i for i in sorted(gone) if i < left]
        movers = [j for j in range(left, self.size) if j not in gone]
        order = list(range(left))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        index = torch.tensor(order, dtype=torch.long, device=self._mask.device)
        for layer in self._cache.layers:
            if not (isinstance(layer, _RoomyLayer) and layer.move_rows(holes, movers, left)):
                layer.batch_select_indices(index)
        self._mask, self._next_pos, self._last = self._mask[index], self._next_pos[index], self._last[index]
        self.rows = [self.rows[i] for i in order]
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if unused >= min(_RoomyLayer.ROOM // 2, self.columns // 4 + 1):  # a copy of the cache pays for itself
            self._mask = self._mask[:, unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        return finished

    def run(self, rows: Sequence[Row], enc: Any | None = None) -> list[Finished]:
        """Answer ``rows`` (a static batch): add them, step until all have finished."""
        finished = self.add(rows, enc)
        while self.rows:
            finished += self.step()
        order = {id(r): i for i, r in enumerate(rows)}
        return sorted(finished, key=lambda f: order[id(f.row)])


class _RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare columns of a larger buffer, which also has spare rows:
    ``keys`` / ``values`` are views of it (the first ``rows`` rows, the first ``used`` columns). Rows that
    join are written into the spare rows (``append_rows``) and rows that leave are filled from the last
    ones (``move_rows``). Whoever replaces ``keys`` otherwise (trimming) gets a fresh buffer on the next
    update, with room again."""

    ROOM = 64  #: spare columns
    ROWS = 16  #: most spare rows (a quarter of the rows at most: the cache is most of the memory)

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _views: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def row_room(cls, rows: int) -> int:
        return min(cls.ROWS, rows // 4)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.keys.shape[-2] if self.keys.numel() else 0
        rows, new = key_states.shape[0], key_states.shape[-2]
        buffers = self._buffers
        if not self._holding() or buffers is None or used + new > buffers[0].shape[-2]:
            buffers = (self._room(self.keys, key_states, used), self._room(self.values, value_states, used))
        buffers[0][:rows, :, used:used + new] = key_states
        buffers[1][:rows, :, used:used + new] = value_states
        self.hold(buffers[0], buffers[1], used + new, rows)
        return self.keys, self.values

    def hold(self, keys: torch.Tensor, values: torch.Tensor, used: int, rows: int | None = None) -> None:
        """Take buffers whose first ``rows`` rows and ``used`` columns are the cache (the rest is room)."""
        rows = keys.shape[0] if rows is None else rows
        self._buffers = (keys, values)
        self._views = (keys[:rows, :, :used], values[:rows, :, :used])
        self.keys, self.values = self._views

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Write joining rows below the running ones, left-padded with zeros to the cache's columns, if
        the buffer has the rows for them and they are no wider (else False: nothing was written)."""
        if not self._holding() or self._buffers is None:
            return False
        rows, used = self.keys.shape[0], self.keys.shape[-2]
        new = keys.shape[0]
        if keys.shape[-2] > used or rows + new > self._buffers[0].shape[0]:
            return False
        pad = used - keys.shape[-2]
        with torch.inference_mode():  # the buffers were made inside the model's forward
            for buffer, part in zip(self._buffers, (keys, values)):
                buffer[rows:rows + new, :, :pad] = 0  # never garbage: a masked NaN still spreads
                buffer[rows:rows + new, :, pad:used] = part
        self.hold(*self._buffers, used, rows + new)
        return True

    def move_rows(self, holes: list[int], movers: list[int], rows: int) -> bool:
        """Keep the first ``rows`` rows, after copying row ``movers[i]`` into row ``holes[i]``."""
        if not self._holding() or self._buffers is None:
            return False
        used = self.keys.shape[-2]
        with torch.inference_mode():
            for buffer in self._buffers:
                for hole, mover in zip(holes, movers):
                    buffer[hole, :, :used] = buffer[mover, :, :used]
        self.hold(*self._buffers, used, rows)
        return True

    def _holding(self) -> bool:
        """``keys`` is still the view of this layer's buffer."""
        return self._views is not None and self.keys is self._views[0]

    def _room(self, old: torch.Tensor, fresh: torch.Tensor, used: int) -> torch.Tensor:
        shape = list(fresh.shape)
        shape[0] += self.row_room(shape[0])
        shape[-2] = used + fresh.shape[-2] + self.ROOM
        buffer = fresh.new_empty(shape)
        if used:
            buffer[:old.shape[0], :, :used] = old
        return buffer


def _roomy_cache(config: Any) -> DynamicCache:
    """The model's own ``DynamicCache`` with its full-attention layers made roomy (sliding-window and
    other layer kinds are kept as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [_RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _stacked(old: torch.Tensor, new: torch.Tensor, width: int, room: int = 0, row_room: int = 0) -> torch.Tensor:
    """``old``'s rows then ``new``'s, each left-padded with zeros to ``width`` columns, in one buffer with
    ``room`` spare columns after them and ``row_room`` spare rows below: one copy of the cache."""
    shape = list(old.shape)
    shape[0], shape[2] = old.shape[0] + new.shape[0] + row_room, width + room
    out = old.new_empty(shape)
    for rows, part in ((slice(0, old.shape[0]), old), (slice(old.shape[0], old.shape[0] + new.shape[0]), new)):
        pad = width - part.shape[2]
        out[rows, :, :pad] = 0
        out[rows, :, pad:width] = part
    return out


def _left_pad(t: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Temperature and nucleus (top-p) sampling for one row, with the row's own generator."""
    scaled = logits / max(sampling.temperature, 1e-5)
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
