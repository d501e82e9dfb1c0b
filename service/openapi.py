"""`openapi.yaml` at the repository root: the API contract, generated from the app.

`python -m service.openapi` rewrites it; `tests/test_service_api.py` fails when the committed file
and the app's schema differ, so the contract and the code cannot drift apart silently.
`shape_contract` turns FastAPI's document into one that clients are generated from well (named
request bodies, authentication stated as optional, since keys are a deployment's choice).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from service.request_context import MAX_REQUEST_ID_CHARS, REQUEST_ID_HEADER
from service.settings import REPO_ROOT, ServiceSettings

OPENAPI_PATH = REPO_ROOT / "openapi.yaml"
_FASTAPI_VALIDATION_REF = "#/components/schemas/HTTPValidationError"
HEADER = "# Generated from the app by `python -m service.openapi`; do not edit by hand.\n"


def shape_contract(document: dict[str, Any]) -> dict[str, Any]:
    """Edit FastAPI's document in place for client generators; returns it.

    - The task and job routes read their bodies themselves (strict JSON, or multipart), so
      their schemas come inline from `openapi_extra`: each is moved to `components/schemas`
      under its title (`DetectRequest`, `DetectForm`, `JobRequest`, ...), nested models too,
      and referenced, so generators name the types so.
    - An API key is needed only where the server is configured with keys. The document says
      so once, at the top: a key as a bearer token or in X-API-Key, or none (`{}`); the routes
      that never take one (health, readiness, metrics) say `security: []`. Generators then
      make a client that works with or without a key (openapi-python-client demands an
      authenticated client for any operation listing its own requirements).
    - Every response carries `X-Request-ID` (`service.request_context`), one shared header.
    - FastAPI documents a 422 `HTTPValidationError` on every route with a parameter; the service
      never sends that body (its errors are `ErrorBody`), and the job routes' only parameter,
      a string id, cannot fail validation: those entries go, with their schemas.
    """
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    keyed: list[dict[str, list[str]]] = []
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            if _FASTAPI_VALIDATION_REF in json.dumps(responses.get("422", {})):
                del responses["422"]
            for media in operation.get("requestBody", {}).get("content", {}).values():
                inline = media.get("schema", {})
                title = inline.get("title")
                if title and "$ref" not in inline:
                    schemas.update(inline.pop("$defs", {}))
                    schemas[title] = inline
                    media["schema"] = {"$ref": f"#/components/schemas/{title}"}
            security = operation.pop("security", None)
            if security:
                keyed = security
            else:
                operation["security"] = []  # never a key: health, readiness, metrics
    if keyed:
        document["security"] = [*keyed, {}]
    _document_request_id(document)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return document


def _document_request_id(document: dict[str, Any]) -> None:
    document.setdefault("components", {}).setdefault("headers", {})[REQUEST_ID_HEADER] = {
        "description": (
            f"The request's id: the client's `{REQUEST_ID_HEADER}` when it sent one of 1 to "
            f"{MAX_REQUEST_ID_CHARS} printable ASCII characters, otherwise a new one (32 hex "
            "digits). Error bodies carry the same id (`error.request_id`), and the service's "
            "access log has it."),
        "schema": {"type": "string", "maxLength": MAX_REQUEST_ID_CHARS},
    }
    reference = {"$ref": f"#/components/headers/{REQUEST_ID_HEADER}"}
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {})[REQUEST_ID_HEADER] = reference


def app_schema() -> dict[str, Any]:
    """The app's OpenAPI document as plain JSON types (independent of the environment)."""
    from service.app import create_app

    # Defaults only, no environment: the schema must not change with a deployment's settings.
    app = create_app(ServiceSettings.model_construct())
    schema: dict[str, Any] = json.loads(json.dumps(app.openapi()))
    return schema


def dump_openapi(path: str | Path = OPENAPI_PATH) -> Path:
    """Write the app's OpenAPI document as YAML to `path`."""
    out = Path(path)
    text = yaml.safe_dump(app_schema(), sort_keys=False, allow_unicode=True, width=100)
    out.write_text(HEADER + text)
    return out


def load_openapi(path: str | Path = OPENAPI_PATH) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(Path(path).read_text())
    return loaded


if __name__ == "__main__":
    print(f"wrote {dump_openapi(sys.argv[1] if len(sys.argv) > 1 else OPENAPI_PATH)}")
