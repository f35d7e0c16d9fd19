"""Security headers: every response says ``X-Content-Type-Options: nosniff`` (no browser reads a JSON
error as a page), and every HTML page says where it may load from (``Content-Security-Policy``) and
that no other site may frame it (``frame-ancestors 'none'``, ``X-Frame-Options: DENY``).

The pages (``routes.docs``: Swagger UI, ReDoc, the playground) load everything from the gateway itself.
Their scripts are files, except Swagger UI's few lines of set-up, which ``content_security_policy``
allows by their hash; styles may be inline (ReDoc and Swagger UI write ``<style>`` elements as they run).
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
#: The policy of every page; ``script-src`` gets the hashes of the page's own inline scripts.
POLICY = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self' 'unsafe-inline'",
    "img-src": "'self' data:",  # the docs' icons and the playground's preview are data: URLs
    "connect-src": "'self'",
    "worker-src": "'self' blob:",  # ReDoc's search runs in a worker it makes from its own code
    "object-src": "'none'",
    "base-uri": "'none'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}


def content_security_policy(page: bytes = b"") -> str:
    """The ``Content-Security-Policy`` of an HTML page: ``POLICY``, its inline ``<script>``s allowed by hash."""
    hashes = ["'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode() + "'"
              for s in _INLINE_SCRIPT.findall(page)]
    policy = {**POLICY, "script-src": " ".join([POLICY["script-src"], *hashes])}
    return "; ".join(f"{name} {value}" for name, value in policy.items())


class SecurityHeaders:
    """ASGI middleware: ``nosniff`` on every response; on an HTML one, its own policy if it set one, else
    ``content_security_policy()`` (no inline script at all), and ``X-Frame-Options: DENY``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                headers["X-Content-Type-Options"] = "nosniff"
                if headers.get("content-type", "").startswith("text/html"):
                    headers.setdefault("Content-Security-Policy", content_security_policy())
                    headers["X-Frame-Options"] = "DENY"
                message = {**message, "headers": headers.raw}
            await send(message)

        await self.app(scope, receive, secured)
