"""`GET /playground`: a page to try every task in a browser (`service/playground/`), and `GET /`
redirecting to it.

The page is plain HTML, JS and CSS shipped in the package (no CDN: the service may run offline);
it calls the public /v1 endpoints like any client, so it needs no route of its own beyond its
files. Outside the OpenAPI contract (`include_in_schema=False`): it is not part of the API.
Only the files of that folder are served, by name, never a path: nothing else is reachable.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import NotFoundError

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
_FILES = {path.name: path for path in PLAYGROUND_DIR.iterdir() if path.is_file()}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/playground")


@router.get("/playground")
async def page() -> FileResponse:
    # The page refers to its files as `playground/NAME`, relative to this URL (no trailing
    # slash), so it also works behind a proxy that serves the app under a path prefix.
    return FileResponse(_FILES["index.html"])


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    if name not in _FILES:
        raise NotFoundError(f"no playground file {name!r}")
    return FileResponse(_FILES[name])
