"""The error tree: every failure has a stable ``code`` and a ``retryable`` flag.

At a boundary (submit, worker, gateway) an exception becomes ``{code, message}`` data; callers match
on ``code``, never on message text.
"""

from __future__ import annotations


class TuwenError(Exception):
    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(TuwenError):
    """The request itself is bad; retrying it unchanged cannot help."""

    code = "invalid_input"


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


class Timeout(TuwenError):
    code = "timeout"
    retryable = True
