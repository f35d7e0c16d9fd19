"""Request body limits per route: the chat API takes its pictures base64-encoded inside JSON, so its
bodies may be larger than a multipart upload's. Each limit is enforced by ``intake.Intake`` (counted
while the body streams in, 413 beyond)."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from tuwen.pipeline.gateway.intake import Intake
from tuwen.pipeline.inputs import in_mib
from tuwen.pipeline.gateway.settings import GatewaySettings
from tuwen.pipeline.settings import Settings

CHAT_PATH = "/v1/chat/completions"
#: The Responses API takes its pictures the same way, with the same limit.
RESPONSES_PATH = "/v1/responses"


def chat_limit(settings: Settings, gw: GatewaySettings) -> int:
    """``TUWEN_GATEWAY_MAX_CHAT_BYTES``, or one picture of ``max_image_bytes`` as base64 plus 1 MiB."""
    return gw.gateway_max_chat_bytes or 4 * -(-settings.max_image_bytes // 3) + 1024 * 1024


def refusal(limit: int, picture_bytes: int, path: str | None) -> str:
    """The 413 of a route that takes pictures says so in MiB ("picture over 20 MiB"): a body too large is
    almost always a picture too large. A chat body carries its pictures base64-encoded (4 bytes for 3)."""
    if path in (CHAT_PATH, RESPONSES_PATH):
        largest = min(picture_bytes, limit // 4 * 3)
        return (f"picture over {in_mib(largest)}, or pictures over {in_mib(limit // 4 * 3)} together: the request "
                f"body exceeds {limit} bytes (TUWEN_MAX_IMAGE_BYTES, TUWEN_GATEWAY_MAX_CHAT_BYTES)")
    if path is None:
        return (f"picture over {in_mib(min(picture_bytes, limit))}: the request body exceeds {limit} bytes "
                "(TUWEN_MAX_IMAGE_BYTES, TUWEN_GATEWAY_MAX_UPLOAD_BYTES)")
    return ""


class BodyLimits:
    """``Intake`` with ``limit``, or with the limit ``larger`` gives the request's path; ``picture_bytes``
    (``TUWEN_MAX_IMAGE_BYTES``) words the 413s of the routes that take pictures."""

    def __init__(self, app: ASGIApp, limit: int, larger: Mapping[str, int], picture_bytes: int) -> None:
        self.default = Intake(app, limit, refusal(limit, picture_bytes, None))
        self.by_path = {path: Intake(app, n, refusal(n, picture_bytes, path)) for path, n in larger.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.default(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        await self.by_path.get(path[len(root):] if root and path.startswith(root) else path, self.default)(
            scope, receive, send)
