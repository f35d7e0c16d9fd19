"""Request body limits per route: the chat API takes its pictures base64-encoded inside JSON, so its
bodies may be larger than a multipart upload's. Each limit is enforced by ``intake.Intake`` (counted
while the body streams in, 413 beyond)."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from tuwen.pipeline.gateway.intake import Intake
from tuwen.pipeline.gateway.settings import GatewaySettings
from tuwen.pipeline.settings import Settings

CHAT_PATH = "/v1/chat/completions"
#: The Responses API takes its pictures the same way, with the same limit.
RESPONSES_PATH = "/v1/responses"


def chat_limit(settings: Settings, gw: GatewaySettings) -> int:
    """``TUWEN_GATEWAY_MAX_CHAT_BYTES``, or one picture of ``max_image_bytes`` as base64 plus 1 MiB."""
    return gw.gateway_max_chat_bytes or 4 * -(-settings.max_image_bytes // 3) + 1024 * 1024


class BodyLimits:
    """``Intake`` with ``limit``, or with the limit ``larger`` gives the request's path."""

    def __init__(self, app: ASGIApp, limit: int, larger: Mapping[str, int]) -> None:
        self.default = Intake(app, limit)
        self.by_path = {path: Intake(app, n) for path, n in larger.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.default(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        await self.by_path.get(path[len(root):] if root and path.startswith(root) else path, self.default)(
            scope, receive, send)
