"""`openapi.yaml` at the repository root: the API contract, generated from the app.

`python -m service.openapi` rewrites it; `tests/test_service_api.py` fails when the committed file
and the app's schema differ, so the contract and the code cannot drift apart silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from service.settings import REPO_ROOT, ServiceSettings

OPENAPI_PATH = REPO_ROOT / "openapi.yaml"
HEADER = "# Generated from the app by `python -m service.openapi`; do not edit by hand.\n"


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
