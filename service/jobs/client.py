"""`glipv2 jobs`: a client for `/v1/jobs` — submit a folder of images, follow its progress,
save the results as JSON Lines, cancel."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
FINISHED = {"done", "failed", "cancelled"}


class JobClient:
    """Blocking calls to one server; `api_key` goes as a Bearer token when given."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 http: httpx.Client | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def submit(self, task: str, params: dict[str, Any], images: list[bytes]) -> dict[str, Any]:
        body = {"task": task, "params": params,
                "inputs": [{"image": base64.b64encode(data).decode()} for data in images]}
        return self._json(self.http.post("/v1/jobs", json=body))

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.delete(f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, poll_s: float = 1.0, progress: bool = True) -> dict[str, Any]:
        """Poll until the job finishes, with a progress bar of inputs done."""
        status = self.status(job_id)
        with tqdm(total=status["progress"]["total"], disable=not progress, unit="img",
                  desc=f"job {job_id[:8]}") as bar:
            while True:
                bar.update(status["progress"]["done"] - bar.n)
                bar.set_postfix(state=status["state"], failed=status["progress"]["failed"])
                if status["state"] in FINISHED:
                    return status
                time.sleep(poll_s)
                status = self.status(job_id)

    def save_results(self, job_id: str, out: Path) -> int:
        """Stream the results into `out` (JSON Lines); returns the number of lines."""
        lines = 0
        with self.http.stream("GET", f"/v1/jobs/{job_id}/results") as response:
            if response.status_code != 200:
                response.read()
                self._json(response)
            with out.open("wb") as sink:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                    lines += chunk.count(b"\n")
        return lines

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = f"{error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise JobClientError(f"HTTP {response.status_code} {message}")
        body: dict[str, Any] = response.json()
        return body


class JobClientError(RuntimeError):
    """The server refused a call; the message carries its error code and message."""


def folder_images(folder: Path) -> list[Path]:
    """Image files of `folder` (not recursive), in name order: the job's input order."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise JobClientError(f"no .png, .jpg or .webp files in {folder}")
    return files
