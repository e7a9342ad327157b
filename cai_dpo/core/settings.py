"""Every setting of the service, read from environment variables (and an optional `.env` file).

One class, one place: the README's settings table is generated from the field descriptions here
(`cai-dpo settings`), so a default documented there is the default used here.
"""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]

BUNDLED_MODEL = "smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAI_", env_file=".env", extra="ignore")

    # --- storage -------------------------------------------------------------------------------
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "CAI_DATABASE_URL"),
        description="PostgreSQL URL. Unset: an embedded PostgreSQL runs in `$CAI_DATA_DIR/postgres`.",
    )
    data_dir: Path = Field(
        PROJECT_ROOT / "data",
        description="Data folder: embedded database, prepared models, training artifacts.",
    )
    models_dir_override: Path | None = Field(
        None,
        validation_alias=AliasChoices("CAI_MODELS_DIR"),
        description="Where prepared models live. Unset: `$CAI_DATA_DIR/models`.",
    )
    constitutions_dir: Path = Field(
        PROJECT_ROOT / "constitutions", description="Folder of constitution YAML files."
    )
    artifact_store: str = Field(
        "",
        description="Where trained models are shared between hosts: a folder every host mounts (read in "
        "place), or an fsspec URL such as `s3://bucket/prefix` (s3fs installed), downloaded once per host. "
        "Unset: each model stays in the training host's `$CAI_DATA_DIR/training`.",
    )

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address of the API.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the API.")
    http_keep_alive_seconds: int = Field(
        75,
        gt=0,
        description="How long the API keeps an idle HTTP connection open: longer than clients keep "
        "theirs for reuse (httpx 5 s, load balancers often 60 s), so a reused connection is never one "
        "the server is closing.",
    )
    api_keys: str = Field(
        "",
        description="API keys (`Authorization: Bearer KEY`), comma-separated: `SECRET` (every scope) or "
        "`NAME:SCOPE+SCOPE:SECRET`. None here or in the keys file: no auth, loopback only.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="YAML file of named keys with scopes (`keys: [{name, scopes, key or sha256}]`), "
        "re-read when it changes.",
    )
    session_secret: str = Field(
        "",
        description="Signs the console's session cookies and CSRF tokens. Unset: a random secret per API "
        "process (console logins end when it restarts; give every API process of one console the same).",
    )
    refusals_per_minute: int = Field(
        60,
        ge=1,
        description="Requests refused for want of a key or scope (401, 403) one client address may make a "
        "minute; past that it gets 429 and no audit row, so it cannot flood the audit log.",
    )
    max_prompts_per_request: int = Field(10_000, ge=1, description="Most prompts one `POST /generate` takes.")
    max_prompt_chars: int = Field(16_000, ge=1, description="Longest prompt (all message contents together).")
    max_messages_per_prompt: int = Field(64, ge=1, description="Most chat messages in one prompt.")
    max_body_bytes: int = Field(
        16 * 2**20, ge=1024, description="Largest JSON request body accepted, in bytes."
    )
    max_constitution_bytes: int = Field(
        256 * 2**10, ge=1024, description="Largest constitution file, in bytes."
    )
    max_import_bytes: int = Field(
        256 * 2**20, ge=1024, description="Largest `/datasets/import` upload, in bytes (read as a stream)."
    )
    max_import_rows: int = Field(200_000, ge=1, description="Most pairs one import takes.")
    max_import_field_chars: int = Field(
        64_000, ge=1, description="Longest imported prompt (all messages) or answer, in characters."
    )
    max_revisions: int = Field(8, ge=1, description="Most critique-and-revise rounds a job may ask for.")
    page_size_max: int = Field(500, ge=1, description="Most rows one page of `GET /pairs` returns.")

    db_pool_size: int = Field(
        10, ge=1, description="Database connections the API keeps (as many again on demand)."
    )
    db_statement_timeout_s: float = Field(
        30.0,
        gt=0,
        description="PostgreSQL `statement_timeout` of every connection (export streams excepted).",
    )
    db_idle_in_transaction_timeout_s: float = Field(
        60.0, gt=0, description="PostgreSQL `idle_in_transaction_session_timeout` of every connection."
    )
    export_concurrency: int = Field(
        4,
        ge=1,
        description="`/export` streams served at once; one more is answered 429 with `Retry-After` at once "
        "(a wait would hold a server thread).",
    )

    # --- models --------------------------------------------------------------------------------
    model: str = Field(
        BUNDLED_MODEL,
        description="Default model: the bundled SmolLM2-135M-Instruct, or a local Hugging Face model folder.",
    )
    model_roots: str = Field(
        "",
        description="Folders, separated by ':', under which a request may name a local model folder (a "
        "reward model, a judge); `CAI_MODELS_DIR` always counts. Checked after resolving links.",
    )
    engine: Literal["vllm", "openai"] = Field(
        "vllm", description="Generation engine: in-process vLLM, or a remote OpenAI-compatible server."
    )
    judge_model: str | None = Field(
        None,
        description="The judge of an evaluation that names none: a model that is neither contestant (a "
        "prepared model, a local folder or `train:<id>`). Unset: the base model. Never the trained model.",
    )

    # --- queue ---------------------------------------------------------------------------------
    lease_seconds: float = Field(60.0, gt=0, description="How long a claimed prompt or training job is held.")
    max_attempts: int = Field(3, ge=1, description="Attempts per prompt before it is marked failed.")
    poll_seconds: float = Field(5.0, gt=0, description="Idle workers poll this often if no NOTIFY comes.")
    db_outage_seconds: float = Field(
        300.0,
        gt=0,
        description="How long a worker waits out a lost database connection (a restart, a failover), "
        "retrying each call and keeping its work, before it exits for its supervisor to restart it.",
    )
    worker_seen_seconds: float = Field(
        60.0, gt=0, description="A worker counts as live this long after a heartbeat."
    )

    # --- generation ----------------------------------------------------------------------------
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Trajectories a generation worker runs at once. Unset: sized to the engine: on a "
        "GPU (or a remote server with `CAI_OPENAI_MAX_NUM_SEQS`) its batch size plus an eighth, then "
        "steered twice a second so the engine's batch stays full and its queue short; 64 on a CPU "
        "or where the engine does not say how full it is.",
    )
    engine_restarts: int = Field(
        3,
        ge=0,
        description="Times a generation worker restarts a dead engine in a row before it exits "
        "(non-zero) for its supervisor to restart it.",
    )
    engine_error_limit: int = Field(
        5,
        ge=1,
        description="Failed requests in a row (no prompt's own fault) after which the engine counts as down.",
    )
    claim_batch: int = Field(
        256,
        ge=1,
        description="Most prompts claimed in one statement. A generation worker claims when an eighth "
        "of its in-flight target is free (at most this many), so claims stay a small share of its "
        "statements at any in-flight.",
    )
    write_batch: int = Field(
        256,
        ge=1,
        description="Most finished prompts a generation worker commits in one transaction. Results "
        "that finish while a write is in flight join the next one (group commit).",
    )
    gpu_hour_cost: float | None = Field(
        None,
        gt=0,
        description="What an hour of one generation engine costs (any currency): /jobs shows each "
        "job's cost, its engine seconds / 3600 x this. Unset: no cost is shown.",
    )
    temperature: float = Field(0.7, ge=0, description="Default sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Default nucleus sampling.")
    max_tokens: int = Field(256, ge=1, description="Default new tokens per generated message.")
    vllm_tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallel size: GPUs per engine core (one model split across them)."
    )
    vllm_data_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM data parallel size: engine cores (each a whole copy of the model on "
        "`CAI_VLLM_TENSOR_PARALLEL_SIZE` GPUs) behind one worker, balanced by vLLM; the worker "
        "needs data x tensor parallel GPUs.",
    )
    vllm_max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="Most sequences vLLM batches in one step (per engine core). Unset: vLLM's "
        "offline default for the hardware (vLLM 0.32: 1024 on an H100, H200 or B200; 256 on "
        "smaller GPUs and the A100; 256 per tensor-parallel rank on CPUs).",
    )
    vllm_max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens vLLM schedules in one step (per engine core; on a GPU chunked "
        "prefill splits longer prompts). Unset: vLLM's offline default (vLLM 0.32: 16384 on an "
        "H100, H200 or B200; 8192 on other GPUs; 4096 per tensor-parallel rank on CPUs, and at "
        "least `CAI_VLLM_MAX_MODEL_LEN` there).",
    )
    vllm_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="vLLM `gpu_memory_utilization`. Unset: 0.25 on the CPU, 0.9 on a GPU."
    )
    vllm_max_model_len: int | None = Field(
        2048, ge=128, description="vLLM context length; prompts longer than it fail alone."
    )
    vllm_enforce_eager: bool | None = Field(
        None,
        description="Skip torch.compile / CUDA graphs. Unset: on for the CPU (faster start), off on a "
        "GPU (CUDA graphs: faster decode steps, at the cost of a longer start).",
    )
    vllm_dtype: str = Field(
        "auto",
        description="vLLM weights dtype. `auto`: the model's, but float32 on CPUs without AVX512-BF16.",
    )
    vllm_load_format: Literal["auto", "dummy"] = Field(
        "auto",
        description="How vLLM loads the weights: `auto` from the model's files; `dummy` fills them with "
        "random values and reads none (throughput benchmarks at a model's shape: bench/generation.py).",
    )
    vllm_kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache size in GiB (overrides the memory fraction; small values suit CPUs).",
    )
    openai_base_url: str = Field(
        "http://127.0.0.1:8001/v1", description="Base URL of the OpenAI-compatible server (`engine=openai`)."
    )
    openai_api_key: str = Field("", description="Bearer key for the OpenAI-compatible server.")
    openai_model: str | None = Field(None, description="Model name to request from it. Unset: `CAI_MODEL`.")
    openai_concurrency: int | None = Field(
        None,
        ge=1,
        description="Requests in flight to the OpenAI-compatible server. Unset: twice "
        "`CAI_OPENAI_MAX_NUM_SEQS` where it is set (the batch and a queue as long), else 32.",
    )
    openai_max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="Most sequences the OpenAI-compatible server batches (`vllm serve --max-num-seqs`, "
        "times its data parallel size), for sizing the requests in flight to it. Unset: unknown.",
    )
    openai_timeout_seconds: float = Field(120.0, gt=0, description="Timeout of one request to it.")
    openai_max_retries: int = Field(4, ge=0, description="Retries (exponential backoff) of a failed request.")

    # --- training ------------------------------------------------------------------------------
    checkpoint_steps: int = Field(
        50, ge=1, description="Training checkpoint every this many optimizer steps."
    )
    train_policies: str = Field(
        "",
        description='Automatic training policies as JSON: `{"harmless": {"min_new_pairs": 500, ...}}`.',
    )
    eval_min_comparisons: int = Field(
        20,
        ge=1,
        description="The promotion gate's minimum number of finished comparisons: an evaluation with fewer "
        "never promotes, whatever its win rate.",
    )

    @field_validator("data_dir", "constitutions_dir", "models_dir_override", "api_keys_file")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @property
    def api_key_list(self) -> list[str]:
        """The secrets of `CAI_API_KEYS` (the CLI sends the first one)."""
        return [entry.strip().split(":", 2)[-1] for entry in self.api_keys.split(",") if entry.strip()]

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_list) or self.api_keys_file is not None

    @property
    def models_dir(self) -> Path:
        return self.models_dir_override or self.data_dir / "models"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "training"


class UnsafeBind(ValueError):
    """The API would listen beyond this host with no API key to guard it."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """No API key means no auth: then only loopback may reach the service."""
    if not settings.auth_enabled and not is_loopback(settings.host):
        raise UnsafeBind(
            f"refusing to listen on {settings.host} without API keys: set CAI_API_KEYS or bind to 127.0.0.1"
        )


@functools.cache
def get_settings() -> Settings:
    return Settings()
