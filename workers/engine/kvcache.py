"""The decode loop's key/value cache: Hugging Face's ``DynamicCache`` with room to grow in place.

``DynamicLayer`` concatenates on every decode step, and a batch that rows join and leave would copy the
whole cache on each join and each leave. ``RoomyLayer`` keeps spare columns and spare rows in a larger
buffer and hands the model views of it: a step writes into the spare columns, joining rows are written
below the running ones, and a leaving row's hole is filled by the last row (``workers.engine``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class RoomyLayer(DynamicLayer):
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


def rows_of(cache: Any, index: torch.Tensor) -> Any:
    """A copy of ``cache`` with the rows ``index`` names, in that order (a row may be named twice: the
    choices of one prompt share its prefill), without spare room: the next update makes some."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        keys, values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if isinstance(part, RoomyLayer):
            part.hold(keys, values, keys.shape[-2])
        else:
            part.keys, part.values = keys, values
        out.layers.append(part)
    return out


def roomy_cache(config: Any) -> DynamicCache:
    """The model's own ``DynamicCache`` with its full-attention layers made roomy (sliding-window and
    other layer kinds are kept as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def stacked(old: torch.Tensor, new: torch.Tensor, width: int, room: int = 0, row_room: int = 0) -> torch.Tensor:
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


def left_pad(t: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
