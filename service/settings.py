"""Every knob of the HTTP service, with its default, in one place.

Values come from (highest priority first) keyword arguments (what `glipv2 serve` flags set),
environment variables with the `GLIPV2_` prefix, then the defaults below. Nested sections use `__`:
`GLIPV2_BATCHER__MAX_BATCH_SIZE=16`. Lists take JSON or commas: `GLIPV2_API_KEYS=key1,key2`.

Units are in the names (`_ms`, `_bytes`, `_pixels`, `_s`), as in the batcher's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engines.kinds import OrtProvider, Precision, RuntimeKind
from engines.runtimes import RuntimeOptions
from service.batching import BatcherConfig
from service.caption_decoder import DecoderConfig
from service.pipeline.caption_search import (
    DEFAULT_BEAMS,
    DEFAULT_LENGTH_PENALTY,
    DEFAULT_MAX_TOKENS,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"


class BatcherSettings(BaseModel):
    """Dynamic-batcher knobs, applied to every engine's batcher (see `BatcherConfig` for the
    semantics and the tuning order)."""

    max_batch_size: int = Field(BatcherConfig.max_batch_size, ge=1,
                                description="Most requests in one engine batch.")
    max_queue_delay_ms: float = Field(
        BatcherConfig.max_queue_delay_ms, ge=0, allow_inf_nan=False,
        description="How long the oldest request of a partial batch waits for company.")
    max_queue_size: int = Field(
        BatcherConfig.max_queue_size, ge=1,
        description="Most requests waiting per engine; beyond it requests get 429 + Retry-After.")
    batch_max_wait_ms: float = Field(
        BatcherConfig.batch_max_wait_ms, ge=0, allow_inf_nan=False,
        description="How long batch-job work waits behind online requests before it is "
                    "served as one of them (so a job progresses under any online load).")

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> BatcherSettings:
        self.to_config()  # BatcherConfig states the cross-field rule and its message
        return self

    def to_config(self, default_deadline_ms: float | None = None) -> BatcherConfig:
        return BatcherConfig(
            max_batch_size=self.max_batch_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_queue_size=self.max_queue_size,
            default_deadline_ms=default_deadline_ms,
            batch_max_wait_ms=self.batch_max_wait_ms,
        )


class ServiceSettings(BaseSettings):
    """Settings of one service process. Tests build one directly with keyword arguments."""

    model_config = SettingsConfigDict(
        env_prefix="GLIPV2_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    model_dir: Path = Field(
        DEFAULT_MODEL_DIR,
        description="Model folder (config.json + model.safetensors) served by the app.")
    model_name: str | None = Field(
        None, description="Model id in responses and /v1/models; default: the folder's name.")
    runtime: RuntimeKind = Field(
        RuntimeKind.PYTORCH,
        description="Inference runtime: PyTorch eager on model_dir, or the exported graphs in "
                    "engine_dir on ONNX Runtime or TensorRT (`make serve`: onnxruntime).")
    engine_dir: Path | None = Field(
        None, description="Engine folder (`glipv2 export`, `glipv2 build-engines`) for the "
                          "onnxruntime and tensorrt runtimes; unset, onnxruntime serves the "
                          "cached export of model_dir (engine_cache_dir).")
    engine_cache_dir: Path = Field(
        REPO_ROOT / "var" / "engines",
        description="Where onnxruntime without engine_dir exports model_dir on first start "
                    "(fp32 and int8; one folder per model contents and export format, "
                    "checksums verified at every start, rebuilt if corrupt).")
    ort_provider: OrtProvider = Field(
        OrtProvider.CPU, description="ONNX Runtime execution provider.")
    precision: Precision = Field(
        Precision.FP32, description="ONNX Runtime variant of the vision and fusion graphs.")
    threads: int = Field(0, ge=0, description="Intra-op compute threads; 0: one per core.")
    text_cache_bytes: int = Field(
        256 * 1024 * 1024, ge=0,
        description="Bound of the text-feature cache (LRU per prompt text); 0 disables it.")
    prompts_dir: Path | None = Field(
        None, description="Folder of tuned prompts (`glipv2 tune-prompt`), served as "
                          "`prompt_id`s; none: no registered prompts.")
    max_segments: int = Field(
        20, ge=1, le=100,
        description="Most segments per referring expression (bounds mask memory per request).")
    max_body_bytes: int = Field(
        20 * 1024 * 1024, ge=1024,
        description="Largest request body (JSON with base64, or multipart); larger is 413.")
    max_image_pixels: int = Field(
        40_000_000, ge=1,
        description="Largest decoded image (width x height), checked from the header before "
                    "decoding; larger is 413.")
    max_concurrent_decodes: int = Field(
        4, ge=1,
        description="Images decoded at once; bounds the memory that concurrent large uploads "
                    "can take before they reach the batcher.")
    request_timeout_ms: float = Field(
        30_000.0, gt=0, allow_inf_nan=False,
        description="Per-request deadline in the batcher, from submission; past it, 504.")
    caption_max_tokens: int = Field(
        DEFAULT_MAX_TOKENS, ge=1, le=256, description="Most tokens a generated caption may have.")
    caption_beams: int = Field(
        DEFAULT_BEAMS, ge=1, le=16,
        description="Beam width of caption decoding: prefixes kept per image (1: greedy), and "
                    "the finished captions the answer is the best of that does not name one "
                    "object twice. Each decoding step runs beams x images rows through the "
                    "caption-step graph.")
    caption_length_penalty: float = Field(
        DEFAULT_LENGTH_PENALTY, ge=0, le=4, allow_inf_nan=False,
        description="A caption's beam-search score is its log-probability divided by its token "
                    "count to this power: 0 ranks by probability (short captions win), 1 by "
                    "the mean per token.")
    caption_max_rows: int = Field(
        DecoderConfig.max_rows, ge=1, le=1024,
        description="Row budget of a caption decoding step: the live beams of every caption "
                    "being decoded run as one caption-step batch of at most this many rows "
                    "(a caption takes `caption_beams`); more captions wait for rows to free.")
    caption_objects: bool = Field(
        True,
        description="Detect the model's caption classes first (config tasks.caption_classes, "
                    "at postprocess.caption_object_threshold) and make the caption name those "
                    "objects, one phrase each, left to right, each phrase ending in its class "
                    "name, read from inside its box and grounded to it; off, the decoder picks "
                    "the phrases and the caption head grounds them.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys for /v1/* (Authorization: Bearer or X-API-Key); "
                    "empty: no authentication.")
    allow_image_urls: bool = Field(
        False, description="Accept http(s) image URLs in `image` (needs image_url_hosts).")
    image_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts image URLs may name (exact, or *.domain); their addresses must be "
                    "public (no private, loopback or link-local), checked on every redirect.")
    image_url_timeout_s: float = Field(
        10.0, gt=0, description="Whole-fetch time limit of an image URL, redirects included.")
    image_url_max_redirects: int = Field(3, ge=0, description="Redirects an image URL may take.")
    jobs_dir: Path = Field(
        REPO_ROOT / "var" / "jobs",
        description="Where batch jobs live (SQLite in WAL mode + one file per input); jobs in "
                    "it survive restarts. Unused with jobs_database_url.")
    jobs_database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:password@host:5432/db) of a job store "
                    "that every replica shares and works on, inputs included; unset: SQLite "
                    "in jobs_dir. Needs the `postgres` extra (psycopg).")
    job_lease_timeout_s: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="With jobs_database_url: job inputs claimed by a replica that stopped "
                    "renewing their lease (it died) go to another after this long; a live "
                    "replica renews every third of it.")
    job_input_dir: Path | None = Field(
        None, description="Folder whose files jobs may name by relative `path`; none: jobs "
                          "send images inline only.")
    max_job_inputs: int = Field(10_000, ge=1, description="Most inputs in one job.")
    max_active_jobs: int = Field(
        16, ge=1, description="Most queued + running jobs; beyond, 429 + Retry-After.")
    max_job_body_bytes: int = Field(
        512 * 1024 * 1024, ge=1024,
        description="Largest `POST /v1/jobs` body (inline images included); larger is 413.")
    job_results_ttl_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="How long a finished job and its results are kept.")
    job_concurrency: int = Field(
        4, ge=1, description="Job inputs in flight at once (a window; cancelling stops after "
                             "it). Smaller leaves more of the engines to online traffic.")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="Graceful-shutdown bound: after SIGTERM, in-flight requests and the job "
                    "window in flight get this long to finish; what is left then is answered "
                    "503 and the process exits 0 (connections get up to 1 s more to close).")
    shutdown_grace_s: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="After SIGTERM the listener stays open at least this long (at most "
                    "shutdown_timeout_s), answering new /v1 requests 503 shutting_down and "
                    "/readyz 503, while load balancers take the replica out of rotation.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Level of the service's logs; the access log's lines are at info "
                            "(warning and above turn them off).")
    access_log: bool = Field(
        True, description="One JSON line per HTTP request on stdout (request id, method, "
                          "route, status, latency, engine batch sizes, error code).")
    playground: bool = Field(
        True, description="Serve the web playground at /playground (/ redirects to it): a "
                          "page to try every task on an image in a browser; off, both 404.")
    batcher: BatcherSettings = Field(default_factory=BatcherSettings)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_keys", "image_url_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        """Environment values are strings: JSON lists and comma-separated items both work."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("jobs_database_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
                ("postgresql://", "postgres://")):
            raise ValueError("jobs_database_url must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _urls_need_an_allowlist(self) -> ServiceSettings:
        if self.allow_image_urls and not self.image_url_hosts:
            raise ValueError("allow_image_urls needs image_url_hosts (the hosts images may "
                             "come from)")
        return self

    @model_validator(mode="after")
    def _tensorrt_needs_engines(self) -> ServiceSettings:
        if self.runtime == RuntimeKind.TENSORRT and self.engine_dir is None:
            raise ValueError("runtime tensorrt needs engine_dir, an engine folder with TensorRT "
                             "engines (`glipv2 export`, then `glipv2 build-engines`)")
        return self

    @property
    def model_id(self) -> str:
        if self.model_name:
            return self.model_name
        if self.runtime != RuntimeKind.PYTORCH and self.engine_dir is not None:
            return self.engine_dir.name
        return self.model_dir.name

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(kind=self.runtime, model_dir=self.model_dir,
                              engine_dir=self.engine_dir,
                              engine_cache_dir=self.engine_cache_dir, provider=self.ort_provider,
                              precision=self.precision, threads=self.threads)

    def api_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]
