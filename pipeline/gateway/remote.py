"""Pictures named by an http(s) URL (the chat and Responses APIs' ``image_url``), fetched by default from
any public address, never from a private one.

Every hop passes the SSRF guard (``ssrf.UrlGuard``: the host on the allow-list when there is one, every
address it resolves to public unless private ones are allowed for tests) and is then fetched from the
address that was checked, so DNS rebinding cannot slip in between. A redirect is followed only by
checking its target the same way, at most ``max_redirects`` times. The body is read, unencoded, up to
``max_bytes``; the whole fetch (resolving, connecting, every redirect and the body) must end within
``timeout_s``, however slowly the server trickles its bytes: one asyncio deadline over all of it.

Failures are ``InvalidInput`` with a code: ``image_url_not_allowed`` (remote pictures off, a host off the
allow-list, a non-public address), ``invalid_image_url``, ``image_url_failed`` (an error status, a broken
connection: retryable where a retry can help), ``image_url_timeout``, ``image_url_too_many_redirects`` and
``image_too_large``.
"""

from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin

import httpx

from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.inputs import picture_too_large
from tuwen.pipeline.gateway.ssrf import ForbiddenTarget, InvalidUrl, Target, UrlGuard

#: The statuses after which the same URL may answer later.
_PASSING = frozenset({408, 425, 429})
#: Threads that resolve host names: a lookup cannot be interrupted, so it runs beside the deadline.
_RESOLVERS = 8


class RemotePictures:
    """Fetches picture URLs through ``guard``; thread-safe. ``fetch`` blocks: call it from a worker
    thread (each call runs its own event loop), never on an event loop."""

    def __init__(self, guard: UrlGuard, max_bytes: int, timeout_s: float, *, max_redirects: int = 3,
                 enabled: bool = True) -> None:
        self.guard, self.max_bytes, self.timeout_s = guard, max_bytes, timeout_s
        self.max_redirects, self.enabled = max_redirects, enabled
        self._tls: ssl.SSLContext = httpx.create_ssl_context()
        self._resolver = ThreadPoolExecutor(max_workers=_RESOLVERS, thread_name_prefix="tuwen-picture-dns")

    def fetch(self, url: str) -> bytes:
        """The picture's bytes (not yet validated as a picture: the caller does that, as for uploads)."""
        if not self.enabled:
            raise InvalidInput("remote pictures are off on this gateway: send the picture as a data: URL "
                               "(base64) or as tuwen://images/<sha256> of a picture sent before",
                               code="image_url_not_allowed")
        return asyncio.run(self._fetch_in_time(url))

    async def _fetch_in_time(self, url: str) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise InvalidInput(f"the picture did not arrive within {self.timeout_s:g}s", code="image_url_timeout",
                               retryable=True) from None
        except httpx.HTTPError as exc:
            raise InvalidInput(f"could not fetch the picture URL: {type(exc).__name__}",
                               code="image_url_failed", retryable=True) from exc

    async def _fetch(self, url: str) -> bytes:
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False, trust_env=False,
                                     verify=self._tls, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            for hop in range(self.max_redirects + 1):
                target = await self._target(url, redirected=hop > 0)
                headers = {"Host": target.host_header, "Accept": "image/*", "Accept-Encoding": "identity"}
                extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
                async with http.stream("GET", target.url, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers["location"])
                        continue
                    return await self._body(response)
        raise InvalidInput(f"the picture URL redirected more than {self.max_redirects} times",
                           code="image_url_too_many_redirects")

    async def _target(self, url: str, redirected: bool) -> Target:
        """``url`` checked by the guard (its host resolved on a resolver thread) and pinned to its address."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._resolver, self.guard.target, url)
        except InvalidUrl as exc:
            if redirected:
                raise InvalidInput(f"the picture URL redirected to a URL tuwen does not fetch: {exc}",
                                   code="image_url_failed") from exc
            raise InvalidInput(str(exc), code="invalid_image_url") from exc
        except ForbiddenTarget as exc:
            where = "the picture URL redirected: " if redirected else ""
            raise InvalidInput(where + str(exc), code="image_url_not_allowed") from exc

    async def _body(self, response: httpx.Response) -> bytes:
        status = response.status_code
        if not response.is_success:
            raise InvalidInput(f"the picture URL answered HTTP {status}", code="image_url_failed",
                               retryable=status >= 500 or status in _PASSING)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidInput(f"the picture URL answered with Content-Encoding {encoding!r}; tuwen asks for the "
                               "picture unencoded", code="image_url_failed")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise picture_too_large(self.max_bytes, int(declared))
        chunks: list[bytes] = []
        got = 0
        async for chunk in response.aiter_raw():  # as the bytes arrive (a chunk size would wait for a trickle)
            got += len(chunk)
            if got > self.max_bytes:
                raise picture_too_large(self.max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._resolver.shutdown(wait=False, cancel_futures=True)
