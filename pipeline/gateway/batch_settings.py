"""The Batch API's limits (``TUWEN_MAX_BATCH_*``), part of the gateway's settings (``GatewaySettings``).

A line's own limit is the chat API's body limit (``bodylimits.chat_limit``): a batch line is one chat
completion request, so it may be as large as one ``POST /v1/chat/completions`` body, and no larger.
"""

from __future__ import annotations

from pydantic import Field

from tuwen.pipeline.settings import TuwenSettings

FILES_PATH = "/v1/files"
#: Room for a multipart upload's own framing (boundaries, part headers, the purpose field).
MULTIPART_SLACK = 64 * 1024


class BatchSettings(TuwenSettings):
    """The OpenAI Batch API's settings (``/v1/files``, ``/v1/batches``, docs/openai.md)."""

    # -- the OpenAI Batch API -----------------------------------------------------------------------------
    #: Largest file ``POST /v1/files`` takes, counted while it streams in (413 ``file_too_large`` beyond;
    #: OpenAI's own limit for batch files is 200 MB).
    max_batch_file_bytes: int = Field(200 * 1024 * 1024, ge=1)
    #: Most request lines in one batch input file (OpenAI's limit: 50,000); a longer file is refused whole.
    max_batch_lines: int = Field(50_000, ge=1)


def files_limit(batch: BatchSettings) -> int:
    """The body limit of ``POST /v1/files``: the largest file plus its multipart framing."""
    return batch.max_batch_file_bytes + MULTIPART_SLACK
