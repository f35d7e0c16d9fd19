"""The pages for people: ``/docs`` (Swagger UI), ``/redoc``, ``/playground`` and its icon, all served from this
gateway, so they work without a network (FastAPI's own pages load their scripts from a CDN). The
scripts and styles come from ``fastapi-offline``'s bundled files, mounted at ``/docs/assets`` (ReDoc's
without the one thing it fetched from elsewhere, a logo); the gateway's own files (``static/``) at
``/static``. Each page's Content-Security-Policy (``security``) allows the gateway alone."""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
from functools import cached_property
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

from tuwen.pipeline.gateway.security import content_security_policy

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS = "/docs/assets"
REDOC = "redoc.standalone.js"
#: ReDoc's footer shows Redocly's logo from a CDN (and hides it when it fails to load): ``data:,`` fails
#: at once, so the page asks nothing of any other host.
REDOC_LOGO = (b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"data:,")

router = APIRouter(include_in_schema=False)


class OfflineAssets(StaticFiles):
    """``fastapi-offline``'s bundled files, ReDoc's script without its CDN logo."""

    def __init__(self) -> None:
        super().__init__(packages=[("fastapi_offline", "static")])

    @cached_property
    def redoc(self) -> bytes:
        full, _ = self.lookup_path(REDOC)
        return Path(full).read_bytes().replace(*REDOC_LOGO)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if path != REDOC or response.status_code != 200:
            return response
        return Response(self.redoc, media_type=response.media_type)  # (the server sends no body to a HEAD)


def mount_files(app: FastAPI) -> None:
    """Serve the docs' scripts at ``/docs/assets`` and ``static/`` at ``/static``."""
    app.mount(ASSETS, OfflineAssets(), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _urls(request: Request) -> tuple[str, str]:
    """The OpenAPI document's URL and the assets' prefix, behind any ``root_path``."""
    root = str(request.scope.get("root_path", ""))
    return f"{root}{request.app.openapi_url}", f"{root}{ASSETS}"


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    page = get_swagger_ui_html(openapi_url=openapi, title=f"{request.app.title} · API",
                               swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                               swagger_css_url=f"{assets}/swagger-ui.css",
                               swagger_favicon_url=f"{assets}/favicon.png",
                               # No badge fetched from validator.swagger.io: nothing leaves the page.
                               swagger_ui_parameters={"validatorUrl": None})
    page.headers["Content-Security-Policy"] = content_security_policy(bytes(page.body))  # its set-up script, by hash
    return page


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    return get_redoc_html(openapi_url=openapi, title=f"{request.app.title} · ReDoc",
                          redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
                          with_google_fonts=False)


@router.get("/playground")
def playground() -> FileResponse:
    """A page to try the chat API in a browser (it needs an API key)."""
    return FileResponse(STATIC / "playground.html", media_type="text/html; charset=utf-8")


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    """The icon browsers ask every page of the gateway for (图 on tuwen's dark blue)."""
    return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")
