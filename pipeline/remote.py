"""Pictures named by an http(s) URL (the chat API's ``image_url``), fetched only from allow-listed hosts.

Every URL passes the SSRF guard first (``ssrf.UrlGuard``: the host on the allow-list, every address it
resolves to public unless private ones are allowed) and is then fetched from the address that was
checked, so DNS rebinding cannot slip in between. Redirects are not followed (the next hop would skip
the guard). The body is read up to ``max_bytes`` and must arrive within ``timeout_s`` (checked as each
piece arrives; each read also times out after ``timeout_s``). Failures are
``InvalidInput`` with a code: ``invalid_image_url``, ``image_url_not_allowed``, ``image_url_failed``
or ``image_too_large``.
"""

from __future__ import annotations

import time

import httpx

from tuwen.pipeline.errors import InvalidImage, InvalidInput
from tuwen.pipeline.ssrf import ForbiddenTarget, InvalidUrl, UrlGuard

class RemotePictures:
    """Fetches picture URLs through ``guard``; thread-safe (one pooled HTTP client)."""

    def __init__(self, guard: UrlGuard, max_bytes: int, timeout_s: float) -> None:
        self.guard, self.max_bytes, self.timeout_s = guard, max_bytes, timeout_s
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False,
                                  limits=httpx.Limits(max_keepalive_connections=0))

    def fetch(self, url: str) -> bytes:
        """The picture's bytes (not yet validated as a picture: the caller does that, as for uploads)."""
        try:
            target = self.guard.target(url)
        except InvalidUrl as exc:
            raise InvalidInput(str(exc), code="invalid_image_url") from exc
        except ForbiddenTarget as exc:
            raise InvalidInput(str(exc), code="image_url_not_allowed") from exc
        headers = {"Host": target.host_header, "Accept": "image/*"}
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._http.stream("GET", target.url, headers=headers, extensions=extensions) as response:
                if not response.is_success:
                    why = " (redirects are not followed)" if response.is_redirect else ""
                    raise InvalidInput(f"the picture URL answered HTTP {response.status_code}{why}",
                                       code="image_url_failed", retryable=True)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise InvalidImage(f"the picture is {declared} bytes; the limit is {self.max_bytes}",
                                       code="image_too_large")
                return self._read(response, deadline)
        except httpx.HTTPError as exc:
            raise InvalidInput(f"could not fetch the picture URL: {type(exc).__name__}",
                               code="image_url_failed", retryable=True) from exc

    def _read(self, response: httpx.Response, deadline: float) -> bytes:
        chunks: list[bytes] = []
        got = 0
        for chunk in response.iter_bytes():  # as the bytes arrive (a chunk size would wait for a trickle)
            got += len(chunk)
            if got > self.max_bytes:
                raise InvalidImage(f"the picture is more than {self.max_bytes} bytes; the limit is {self.max_bytes}",
                                   code="image_too_large")
            if time.monotonic() > deadline:
                raise InvalidInput(f"the picture did not arrive within {self.timeout_s:g}s", code="image_url_failed",
                                   retryable=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._http.close()
