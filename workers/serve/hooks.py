"""Test and benchmark hooks: how the drills and the benchmark reach into a worker process.

Kept out of the user-facing ``Settings`` (and out of docs/configuration.md): an operator never sets
these. They are read from ``TUWEN_HOOK_*`` at worker start, like the settings, and passed down.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tuwen.pipeline.settings import TuwenSettings


class Hooks(TuwenSettings):
    model_config = SettingsConfigDict(env_prefix="TUWEN_HOOK_")

    #: Benchmark: answer every job with an empty answer and no model (measures transport alone).
    null_model: bool = False
    #: Drill: raise out-of-memory when a model batch of at least this many rows would run (0: off).
    oom_min_batch: int = Field(0, ge=0)
    #: Drill: the consuming loop blocks for good once it has received this many messages (0: off).
    stall_after_jobs: int = Field(0, ge=0)
    #: Drill: the model raises (a plain ``RuntimeError``, as a bug would) on any join or decode step that
    #: holds a row whose prompt contains this text ("": off).
    fail_rows_with: str = ""
    #: Drill: the decode loop's thread ends (an error past its ``except Exception``, as a fault nobody caught
    #: would) on any join or decode step that holds a row whose prompt contains this text ("": off); the
    #: worker's jobs then fail with ``model_error``.
    end_loop_with: str = ""

    def to_env(self) -> dict[str, str]:
        """These hooks as ``TUWEN_HOOK_*`` variables for a worker subprocess (only those that are set)."""
        out = {}
        for name, value in self.model_dump().items():
            if value != type(self).model_fields[name].default:
                out["TUWEN_HOOK_" + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def injected_oom(min_batch: int) -> Any:
    """A ``Runtime.before_generate`` hook that raises out-of-memory for batches of ``min_batch`` or more."""

    def before_generate(batch_size: int) -> None:
        import torch

        if batch_size >= min_batch:
            raise torch.OutOfMemoryError(f"injected out-of-memory for a batch of {batch_size} (test hook)")

    return before_generate


def injected_row_failure(text: str) -> Any:
    """A ``Scheduler.before_rows`` hook that raises for any rows among which a prompt contains ``text``."""

    def before_rows(rows: list[Any]) -> None:
        if any(text in row.prompt for row in rows):
            raise RuntimeError(f"injected model failure on a batch of {len(rows)} holding {text!r} (test hook)")

    return before_rows


class LoopEnded(BaseException):
    """What ``end_loop_with`` raises: past the decode loop's ``except Exception``, so its thread ends."""


def injected_loop_end(text: str) -> Any:
    """A ``Scheduler.before_rows`` hook that ends the decode loop once a row's prompt contains ``text``."""

    def before_rows(rows: list[Any]) -> None:
        if any(text in row.prompt for row in rows):
            raise LoopEnded(f"injected end of the decode loop on a batch of {len(rows)} holding {text!r} (test hook)")

    return before_rows
