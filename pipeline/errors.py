"""The error tree: every failure has a stable ``code``, a ``retryable`` flag and an HTTP status.

At a boundary (submit, worker, gateway) an exception becomes ``{code, message}`` data; callers match
on ``code``, never on message text. The catalogue (``ErrorCode``) says once per code whether a retry may
help and which HTTP status answers it; ``http_status`` is the one mapping from a code to a status, for
tuwen's own routes, the OpenAI-compatible ones and the lines of a Batch API error file alike.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """Every error code tuwen gives: its HTTP status on tuwen's own routes, what it means, and whether the
    same request may succeed later.

    docs/errors.md is generated from this list (``python -m tuwen.pipeline.errors``); a test fails when
    the two differ, or when the code base uses a code that is not here.
    """

    status: int
    meaning: str
    retryable: bool

    def __new__(cls, value: str, status: int, meaning: str, retryable: bool = False) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.meaning = meaning
        member.retryable = retryable
        return member

    # -- the request ---------------------------------------------------------------------------------
    invalid_input = ("invalid_input", 422, "The request is refused as it is; sending it again unchanged cannot help.")
    invalid_request = ("invalid_request", 422, "The HTTP request is malformed (a field missing or of the wrong type).")
    invalid_json = ("invalid_json", 400, "A JSON request body nests arrays and objects deeper than 32 levels (refused "
                    "before it is parsed).")
    invalid_params = ("invalid_params", 422, "A generation parameter or form field is unknown, repeated or out of "
                      "range.")
    invalid_messages = ("invalid_messages", 422, "The conversation's shape is wrong: roles, order, or a picture "
                        "outside a user message.")
    invalid_question = ("invalid_question", 422, "The question is not valid text (not UTF-8, control characters).")
    empty_question = ("empty_question", 422, "There is no question: empty, or only whitespace and invisible "
                      "characters.")
    missing_question = ("missing_question", 422, "A bulk line has no question and the submission gave none.")
    question_too_long = ("question_too_long", 422, "The question alone is longer than TUWEN_MAX_CONVERSATION_CHARS, a "
                         "sanity cap far above any real prompt (the model's context decides, in tokens).")
    conversation_too_long = ("conversation_too_long", 422, "The conversation's text is longer than "
                             "TUWEN_MAX_CONVERSATION_CHARS.")
    context_too_long = ("context_too_long", 422, "The conversation in tokens, plus max_tokens, does not fit the "
                        "model's context; the message gives the counts (or ask for truncation: oldest_turns).")
    too_many_images = ("too_many_images", 422, "More pictures than the model family (or TUWEN_MAX_IMAGES_PER_JOB) "
                       "takes in one job.")
    unprocessable_input = ("unprocessable_input", 422, "This job alone could not be answered: its prompt would hold "
                           "special tokens its chat template did not write, or the processor or the model failed on it "
                           "with no other job beside it; the message says why. Its batch-mates are answered.")
    invalid_schema = ("invalid_schema", 400, "A response_format's JSON schema, or a tool's parameters, cannot be "
                      "enforced: it does not compile, or uses a feature the grammar library lacks (the message names "
                      "it; param names the field).")
    request_too_large = ("request_too_large", 413, "The request body is larger than the gateway accepts.")
    unsupported_parameter = ("unsupported_parameter", 422, "A chat completions or Responses parameter tuwen does not "
                             "support (tool_choice auto, the Responses API's tools, n, top_logprobs, text.format, "
                             "reasoning, background...); the error's param names it.")
    method_not_allowed = ("method_not_allowed", 405, "This path does not take this HTTP method.")
    http_error = ("http_error", 400, "Another HTTP-level refusal; the status code says which.")
    # -- pictures ------------------------------------------------------------------------------------
    invalid_image = ("invalid_image", 422, "The picture is not something tuwen can read (for example a text-mode "
                     "file).")
    empty_image = ("empty_image", 422, "The picture has no bytes.")
    missing_image = ("missing_image", 422, "A bulk line names no picture.")
    corrupt_image = ("corrupt_image", 422, "The picture's data is damaged or truncated.")
    unsupported_image_format = ("unsupported_image_format", 422, "Not a PNG, JPEG, GIF, WebP, BMP, TIFF, HEIF or AVIF.")
    image_too_large = ("image_too_large", 422, "The picture file is larger than TUWEN_MAX_IMAGE_BYTES (an upload, a "
                       "data: URL, or a remote picture, by its Content-Length or as its bytes arrive).")
    image_too_many_pixels = ("image_too_many_pixels", 422, "The picture has more pixels than TUWEN_MAX_IMAGE_PIXELS "
                             "(checked before decoding).")
    bad_aspect_ratio = ("bad_aspect_ratio", 422, "The picture is longer than TUWEN_MAX_ASPECT_RATIO times its width, "
                        "or the other way round.")
    image_not_found = ("image_not_found", 422, "No such picture for this owner: missing, expired, outside the images "
                       "folder, or stored by someone else (all worded alike).")
    image_url_not_allowed = ("image_url_not_allowed", 422, "A remote picture URL tuwen will not fetch: remote pictures "
                             "are off (TUWEN_GATEWAY_IMAGE_URLS=false), its host is not in "
                             "TUWEN_GATEWAY_IMAGE_URL_HOSTS (when that is set), or it resolves or redirects to a "
                             "loopback, private, link-local or other non-public address.")
    invalid_image_url = ("invalid_image_url", 422, "An image_url that is not a data: URL, a tuwen://images/<sha256> "
                         "key or an http(s) URL.")
    image_url_failed = ("image_url_failed", 422, "A remote picture could not be fetched: its server answered an error "
                        "status (a retry may help after a 5xx or 429, not after a 404), broke the connection, sent it "
                        "encoded (gzip), or redirected to a URL that is not http(s).", True)
    image_url_timeout = ("image_url_timeout", 422, "A remote picture did not arrive whole within "
                         "TUWEN_GATEWAY_IMAGE_URL_TIMEOUT_S (resolving, connecting, redirects and the body "
                         "together).", True)
    image_url_too_many_redirects = ("image_url_too_many_redirects", 422, "A remote picture URL redirected more than "
                                    "TUWEN_GATEWAY_IMAGE_URL_MAX_REDIRECTS times.")
    # -- PDFs (their pages become pictures before anything is stored) ------------------------------------------
    not_a_pdf = ("not_a_pdf", 422, "A file given as a PDF is empty or is not a PDF (no %PDF- header); tuwen reads PDFs "
                 "and pictures.")
    pdf_too_large = ("pdf_too_large", 422, "The PDF is larger than TUWEN_MAX_PDF_BYTES.")
    corrupt_pdf = ("corrupt_pdf", 422, "The PDF is damaged or truncated: PDFium cannot open it, or a page cannot be "
                   "read or rendered.")
    encrypted_pdf = ("encrypted_pdf", 422, "The PDF needs a password to open; send it decrypted.")
    empty_pdf = ("empty_pdf", 422, "The PDF has no pages.")
    too_many_pages = ("too_many_pages", 422, "The PDF has more pages than TUWEN_MAX_PDF_PAGES, or a chat request's "
                      "PDFs have more pages than the served model takes pictures in one job (the message says how "
                      "many fit).")
    pdf_page_too_large = ("pdf_page_too_large", 422, "A PDF page would render to more than TUWEN_MAX_IMAGE_PIXELS "
                          "pixels at TUWEN_PDF_MIN_DPI (checked from its size before drawing: a PDF bomb).")
    invalid_pages = ("invalid_pages", 422, "A page list (pages: \"3-5,9\") is malformed or names a page the PDF "
                     "does not have.")
    # -- spoken questions ----------------------------------------------------------------------------
    invalid_audio = ("invalid_audio", 422, "The spoken question is not something tuwen can read.")
    empty_audio = ("empty_audio", 422, "The audio has no bytes, or lasts 0 seconds.")
    corrupt_audio = ("corrupt_audio", 422, "The audio's header or data is damaged or truncated.")
    unsupported_audio_format = ("unsupported_audio_format", 422, "Not WAV, FLAC, Ogg (Vorbis, Opus) or MP3.")
    audio_too_large = ("audio_too_large", 422, "The audio file is larger than TUWEN_MAX_AUDIO_BYTES.")
    audio_too_long = ("audio_too_long", 422, "The audio lasts longer than TUWEN_MAX_AUDIO_SECONDS, by its header or "
                      "as it decodes (a small compressed file that expands past the limit stops there).")
    bad_sample_rate = ("bad_sample_rate", 422, "The audio's sample rate is outside 8 kHz to 192 kHz.")
    too_many_channels = ("too_many_channels", 422, "The audio has more than two channels.")
    no_speech = ("no_speech", 422, "The audio is silent (its loudest 30 ms stay below -50 dBFS), or the speech "
                 "model heard no words in it.")
    audio_not_found = ("audio_not_found", 422, "A spoken question's audio is no longer in storage.")
    file_not_found = ("file_not_found", 422, "A local file the command was given does not exist.")
    file_not_readable = ("file_not_readable", 422, "A local file exists but cannot be read (permissions, a folder, a "
                         "FIFO).")
    # -- jobs and bulks ------------------------------------------------------------------------------
    not_found = ("not_found", 404, "No such job or stored response for this owner (never submitted, expired, deleted, "
                 "not stored, or another owner's: all worded alike).")
    cancelled = ("cancelled", 409, "The job was cancelled before it ran.")
    already_finished = ("already_finished", 409, "The job has ended; it can no longer be cancelled.")
    too_many_attempts = ("too_many_attempts", 500, "The job was started TUWEN_MAX_ATTEMPTS times without finishing "
                         "(its worker kept dying); it is failed for good.")
    job_expired = ("job_expired", 404, "A bulk line's job record expired before its result was read.")
    bulk_not_found = ("bulk_not_found", 404, "No such bulk (never created, expired, or another owner's).")
    bulk_busy = ("bulk_busy", 503, "Another process is submitting or cancelling this bulk right now.", True)
    bulk_expired = ("bulk_expired", 409, "The bulk did not finish within its completion window; its line was "
                    "cancelled.")
    invalid_manifest = ("invalid_manifest", 422, "A bulk input file is refused as a whole (the message lists the "
                        "lines).")
    # -- bulk and Batch API input files (each refuses the whole file; the batch's errors list the lines) --
    invalid_json_line = ("invalid_json_line", 422, "An input line is not a JSON object (not JSON, not UTF-8, or nested "
                         "too deep).")
    missing_custom_id = ("missing_custom_id", 422, "An input line has no custom_id, or one that is not a non-empty "
                         "string of at most 512 characters.")
    duplicate_custom_id = ("duplicate_custom_id", 422, "Two lines of an input file have the same custom_id.")
    invalid_method = ("invalid_method", 422, "A Batch API line's method is not POST.")
    invalid_url = ("invalid_url", 422, "A Batch API line's url is not the batch's endpoint (/v1/chat/completions or "
                   "/v1/responses).")
    missing_body = ("missing_body", 422, "A Batch API line has no body object (the request of the batch's endpoint).")
    line_too_long = ("line_too_long", 422, "A Batch API line is longer than one chat or Responses request may be "
                     "(TUWEN_GATEWAY_MAX_CHAT_BYTES).")
    too_many_lines = ("too_many_lines", 422, "A Batch API input file has more lines than TUWEN_MAX_BATCH_LINES.")
    empty_file = ("empty_file", 422, "The input file has no lines.")
    # -- the Batch API: files and batches (/v1/files, /v1/batches) -----------------------------------
    file_too_large = ("file_too_large", 413, "An uploaded file is larger than TUWEN_MAX_BATCH_FILE_BYTES.")
    unsupported_purpose = ("unsupported_purpose", 422, "A file uploaded with a purpose tuwen does not keep (it keeps "
                           "batch and user_data), or used where its purpose does not fit: a batch reads a batch file, "
                           "a chat or response a user_data PDF.")
    unknown_file = ("unknown_file", 404, "No such file for this owner (never uploaded, deleted, expired, or another "
                    "owner's: all worded alike).")
    file_in_use = ("file_in_use", 409, "The file is the input of a batch that is still reading it; delete it once the "
                   "batch has ended.", True)
    invalid_endpoint = ("invalid_endpoint", 422, "A batch for another endpoint than /v1/chat/completions or "
                        "/v1/responses (the ones tuwen serves).")
    invalid_completion_window = ("invalid_completion_window", 422, "A batch's completion_window is not 24h.")
    batch_ended = ("batch_ended", 409, "The batch has ended (completed, failed or expired); it can no longer be "
                   "cancelled.")
    # -- API keys, owners, the gateway ---------------------------------------------------------------
    unauthorized = ("unauthorized", 401, "No API key was sent (Authorization: Bearer <key>).")
    invalid_api_key = ("invalid_api_key", 401, "The API key is unknown or revoked.")
    forbidden = ("forbidden", 403, "The key may not do this.")
    invalid_owner = ("invalid_owner", 422, "An owner name that is empty, too long or has characters outside the "
                     "allowed set.")
    rate_limited = ("rate_limited", 429, "Too many requests for this API key; Retry-After says when to try "
                    "again.", True)
    conflict = ("conflict", 409, "The thing exists already (for example an API key name).")
    idempotency_key_reused = ("idempotency_key_reused", 422, "This Idempotency-Key was used for a different request.")
    idempotency_in_progress = ("idempotency_in_progress", 409, "A request with this Idempotency-Key is still being "
                               "handled.", True)
    invalid_idempotency_key = ("invalid_idempotency_key", 422, "The Idempotency-Key header is empty or too long.")
    invalid_callback_url = ("invalid_callback_url", 422, "The webhook URL is malformed, too long, or not http(s).")
    callback_not_allowed = ("callback_not_allowed", 422, "The webhook URL's host is not allowed or resolves to a "
                            "private address.")
    webhooks_disabled = ("webhooks_disabled", 422, "This gateway sends no webhooks (no signing secret configured).")
    model_not_served = ("model_not_served", 404, "No live worker serves the model the request names (503 with "
                        "Retry-After, not 404, when no worker is live at all: the one status that is not the code's "
                        "alone).")
    # -- services and the model ---------------------------------------------------------------------
    service_unavailable = ("service_unavailable", 503, "Redis or the broker did not answer; the same call may work "
                           "later.", True)
    storage_unavailable = ("storage_unavailable", 503, "The S3 / MinIO server did not answer.", True)
    storage_auth_failed = ("storage_auth_failed", 503, "The S3 / MinIO server refused tuwen's credentials.")
    storage_misconfigured = ("storage_misconfigured", 503, "The bucket or endpoint setting is wrong.")
    invalid_key = ("invalid_key", 500, "An object key that tuwen would never create.")
    invalid_setting = ("invalid_setting", 500, "A TUWEN_* setting is malformed (a URL without a scheme, a placeholder "
                       "secret).")
    timeout = ("timeout", 504, "The answer did not come within the wait; the job goes on (poll it by id).", True)
    out_of_memory = ("out_of_memory", 500, "The model ran out of memory on this job alone.")
    model_error = ("model_error", 503, "The model failed on this job or batch.", True)
    constraint_failed = ("constraint_failed", 500, "The grammar that constrains this job's answer "
                         "(response_format) failed on it; its batch-mates are answered.")
    model_not_found = ("model_not_found", 500, "The worker's checkpoint directory has no config.json.")
    internal_error = ("internal_error", 500, "A fault in tuwen, not in the request (the message says where): jobs that "
                      "failed beside a bad one, or a bug; the same request may succeed when sent again.", True)


def http_status(code: str, *, openai: bool = False) -> int:
    """The HTTP status that answers an error with ``code``: the catalogue's (500 for a code not in it). The
    OpenAI-compatible routes and Batch API lines (``openai``) answer 400 where tuwen's own routes answer 422,
    as OpenAI does (its SDK raises ``BadRequestError`` for it)."""
    member = ErrorCode._value2member_map_.get(code)
    status = member.status if isinstance(member, ErrorCode) else 500
    return 400 if openai and status == 422 else status


def error_table() -> str:
    """The Markdown table of docs/errors.md."""
    lines = ["| code | HTTP status | retry may help | meaning |", "|---|---|---|---|"]
    lines += [f"| `{c.value}` | {c.status} | {'yes' if c.retryable else 'no'} | {c.meaning} |" for c in ErrorCode]
    return "\n".join(lines)


class TuwenError(Exception):
    """An error with a code of the catalogue: its ``status`` is the code's, and so is ``retryable`` unless this
    error knows better whether a retry may help (a remote picture's 404 is no use retrying, its 503 is)."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is None:  # the catalogue's word for the code, unless this error knows better
            member = ErrorCode._value2member_map_.get(self.code)
            retryable = member.retryable if isinstance(member, ErrorCode) else None
        if retryable is not None:
            self.retryable = retryable

    @property
    def status(self) -> int:
        """The HTTP status that answers this error on tuwen's own routes (``http_status``)."""
        return http_status(self.code)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def as_error(self) -> dict[str, Any]:
        """The error as result data, ``retryable`` included (``schema.ErrorInfo``'s fields)."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class InvalidInput(TuwenError):
    """The request itself is bad; retrying it unchanged cannot help. ``param`` names the request field at
    fault, where there is one (as OpenAI's error bodies do)."""

    code = "invalid_input"

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.param = param


class InvalidImage(InvalidInput):
    code = "invalid_image"


class InvalidQuestion(InvalidInput):
    code = "invalid_question"


class InvalidParams(InvalidInput):
    code = "invalid_params"


class NotFound(TuwenError):
    code = "not_found"


class Forbidden(TuwenError):
    code = "forbidden"


class Unavailable(TuwenError):
    """A service we depend on (Redis, S3) did not answer; the same call may work later."""

    code = "service_unavailable"
    retryable = True


class OutOfMemory(TuwenError):
    code = "out_of_memory"


class ModelError(TuwenError):
    code = "model_error"
    retryable = True



if __name__ == "__main__":
    print("# Error codes\n\nEvery error tuwen gives carries one of these codes (generated from "
          "`tuwen.pipeline.errors.ErrorCode`; match on the code, never on the message). The HTTP status is the "
          "one tuwen's own routes answer for the code; the OpenAI-compatible routes (for a failed job too) and a "
          "batch's error file say 400 where it says 422, as OpenAI does. On `GET /v1/jobs/{id}` a failed job is "
          "a 200, its code in `error`.\n")
    print(error_table())
