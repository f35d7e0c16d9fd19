"""``/v1/files``: the Batch API's files, per owner, in OpenAI's shapes (walk-through: docs/openai.md).

``POST`` takes a multipart upload (``file``, ``purpose=batch``, or ``user_data`` for a PDF that chat
and responses name by ``file_id``: ``pdf_pages``) and streams it to storage part by part,
never whole in memory (413 ``file_too_large`` past ``TUWEN_MAX_BATCH_FILE_BYTES``); ``GET`` lists the
owner's files (``purpose``, ``after``, ``limit``, ``order``), ``GET /{id}`` reads one, ``GET /{id}/content``
streams its bytes (a batch's output and error files are files too) and ``DELETE /{id}`` deletes it (409
``file_in_use`` while a batch still reads it). Another owner's file is a 404, worded as a missing one.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tuwen.pipeline.gateway.apikeys import ApiKey
from tuwen.pipeline.bulk.files import (
    FILE_ID_PATTERN, UPLOAD_PURPOSES, USER_DATA_PURPOSE, FileTooLarge, StoredFile, no_such_file)
from tuwen.pipeline.envelope import printable
from tuwen.pipeline.errors import NotFound
from tuwen.pipeline.gateway.batch_keeper import BatchKeeper, Keeper
from tuwen.pipeline.gateway.batch_objects import (
    EXAMPLE_FILE_ID, FileDeleted, FileList, FileObject, error_responses, listing)
from tuwen.pipeline.gateway.deps import Reader, State, Submitter, charge
from tuwen.pipeline.gateway.openai_errors import OpenAIRoute, openai_error
from tuwen.pipeline.gateway.openai_request import printable_name
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.pdf import InvalidPdf, check_pdf

router = APIRouter(prefix="/v1/files", tags=["batches"], route_class=OpenAIRoute)

_FILE_ID = re.compile(FILE_ID_PATTERN)
UPLOAD_FIELDS = ("file", "purpose")
MAX_FILENAME = 255
FileId = Annotated[str, Path(max_length=80, examples=[EXAMPLE_FILE_ID])]


class FileQuery(BaseModel):
    """The query of ``GET /v1/files``; another parameter is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    #: ``batch`` or ``user_data`` (uploaded) or ``batch_output`` (written by batches); all if absent.
    purpose: Literal["batch", "user_data", "batch_output"] | None = None
    limit: int = Field(10_000, ge=1, le=10_000)
    #: A file id: the page after it.
    after: str | None = Field(None, pattern=FILE_ID_PATTERN, max_length=80)
    order: Literal["asc", "desc"] = "desc"


def owned_file(state: GatewayState, keeper: BatchKeeper, key: ApiKey, file_id: str) -> StoredFile:
    """The caller's file, or the one 404 (a miss counts against the rate limit: guessing stays limited)."""
    try:
        if not _FILE_ID.fullmatch(file_id):
            raise no_such_file(file_id)
        return keeper.files.get(file_id, key.owner)
    except NotFound:
        charge(state, key)
        raise


def upload_body() -> dict[str, Any]:
    """The multipart body of ``POST /v1/files`` for the OpenAPI document (read by the route itself, after
    the API key is checked)."""
    schema = {"type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "description": "batch: JSONL, one {custom_id, method: POST, url, body} per line; user_data: a PDF"},
        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post("", response_model=FileObject, openapi_extra=upload_body(),
             summary="上传文件 · upload a Batch API input file (purpose=batch) or a PDF (purpose=user_data)",
             responses=error_responses(400, 401, 413, 429, 503))
async def upload_file(key: Submitter, state: State, keeper: Keeper, request: Request) -> FileObject:
    """The file is streamed to storage part by part, never held whole; past `TUWEN_MAX_BATCH_FILE_BYTES`
    (`TUWEN_MAX_PDF_BYTES` for `user_data`) the answer is 413 `file_too_large` and nothing is kept. A
    `user_data` file must be a PDF tuwen can read: else 400 with its code (`not_a_pdf` …), and it is not kept."""
    form = await request.form(max_files=1, max_fields=len(UPLOAD_FIELDS))
    try:
        names = [name for name, _ in form.multi_items()]
        for name in names:
            if name not in UPLOAD_FIELDS:
                raise openai_error("invalid_params", "Unrecognized request argument supplied: "
                                   f"{printable(printable_name(name))}", param=printable(printable_name(name)))
            if names.count(name) > 1:
                raise openai_error("invalid_params", f"{name} was sent more than once", param=name)
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or not purpose:
            raise openai_error("invalid_params", "purpose is required: batch or user_data", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise openai_error("unsupported_purpose", f"purpose {printable(purpose[:64])!r}: tuwen keeps "
                               "Batch API files (batch) and PDFs for conversations (user_data)", param="purpose")
        if not isinstance(upload, UploadFile):
            raise openai_error("invalid_params", "file is required: the file part (with a filename)",
                               param="file")
        filename = printable((upload.filename or "upload.jsonl")[:MAX_FILENAME])
        try:
            limit = state.settings.max_pdf_bytes if purpose == USER_DATA_PURPOSE else state.gw.max_batch_file_bytes
            stored = await run_in_threadpool(keeper.files.upload, key.owner, filename, purpose, upload.file, limit)
        except FileTooLarge as exc:
            setting = "TUWEN_MAX_PDF_BYTES" if purpose == USER_DATA_PURPOSE else "TUWEN_MAX_BATCH_FILE_BYTES"
            raise openai_error(exc.code, exc.message.replace("TUWEN_MAX_BATCH_FILE_BYTES", setting),
                               param="file") from None
    finally:
        await form.close()
    if purpose == USER_DATA_PURPOSE:
        await run_in_threadpool(checked_pdf, state, keeper, stored)
    return FileObject.of(stored)


def checked_pdf(state: GatewayState, keeper: BatchKeeper, file: StoredFile) -> None:
    """A ``user_data`` upload is a PDF tuwen can read (``pipeline.pdf``), or it is deleted and refused with
    its code (``not_a_pdf``, ``corrupt_pdf`` …): nothing is kept that no conversation could use."""
    try:
        check_pdf(b"".join(keeper.files.chunks(file)), state.settings)
    except InvalidPdf as exc:
        keeper.files.delete(file)
        raise openai_error(exc.code, exc.message, param="file") from None


@router.get("", response_model=FileList, summary="文件列表 · the caller's files, newest first",
            responses=error_responses(400, 401, 503))
async def list_files(key: Reader, keeper: Keeper, query: Annotated[FileQuery, Query()]) -> FileList:
    """The caller's files (uploaded, and the batches' output and error files) by creation time."""
    files, more = await run_in_threadpool(keeper.files.page, key.owner, purpose=query.purpose, limit=query.limit,
                                          after=query.after, ascending=query.order == "asc")
    return FileList(**listing([FileObject.of(f) for f in files], more))


@router.get("/{file_id}", response_model=FileObject, summary="一个文件 · one file",
            responses=error_responses(400, 401, 404, 429, 503))
async def get_file(key: Reader, state: State, keeper: Keeper, file_id: FileId) -> FileObject:
    return FileObject.of(await run_in_threadpool(owned_file, state, keeper, key, file_id))


@router.get("/{file_id}/content", summary="文件内容 · a file's bytes (a batch's output: JSONL)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}},
                             "description": "the file's bytes, streamed"},
                       **error_responses(400, 401, 404, 429, 503)})
async def file_content(key: Reader, state: State, keeper: Keeper, file_id: FileId) -> StreamingResponse:
    """The file's bytes, streamed part by part (the first part is read before the answer starts, so a
    storage outage is a 503, not a cut stream)."""
    file = await run_in_threadpool(owned_file, state, keeper, key, file_id)
    chunks = keeper.files.chunks(file)
    first = await run_in_threadpool(next, chunks, b"")

    def body() -> Iterator[bytes]:
        yield first
        yield from chunks

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"Content-Length": str(file.bytes)})


@router.delete("/{file_id}", response_model=FileDeleted, summary="删除文件 · delete a file",
               responses=error_responses(400, 401, 404, 409, 429, 503))
def delete_file(key: Submitter, state: State, keeper: Keeper, file_id: FileId) -> FileDeleted:
    """Deletes the file and its bytes; 409 `file_in_use` while a batch still reads it (validating, or
    submitting its lines)."""
    file = owned_file(state, keeper, key, file_id)
    reading = keeper.file_readers(file)
    if reading:
        raise openai_error("file_in_use", f"batch {reading[0]} still reads this file; delete it once the "
                           "batch is in progress with every line submitted, or has ended", headers={"Retry-After": "5"})
    keeper.files.delete(file)
    return FileDeleted(id=file.id)
