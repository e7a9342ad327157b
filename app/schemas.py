"""Pydantic models at the HTTP edge: request bodies and response shapes.

Limits that come from settings (prompt count, prompt length) are checked by
`normalize_prompts`, which raises `FieldError` naming the offending field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cai_dpo.core.generation_modes import CalibrateOptions, CompareOptions, GenerationMode, Sampling
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.pair_flags import FLAGS
from cai_dpo.core.strict_json import StrictJson

# A `next_cursor`: the last id of the previous page.
Cursor = Annotated[str, Field(pattern=r"^\d{1,18}$", description="`next_cursor` of the previous page.")]


class ErrorItem(BaseModel):
    field: str = Field(
        description="Where the fault is: a body field (`prompts.3.content`), a parameter (`job_id`), "
        "a header (`authorization`, `content-type`), or `body` as a whole."
    )
    message: str
    line: int | None = Field(None, description="`POST /datasets/import`: the upload's line at fault.")


class ErrorBody(BaseModel):
    """Every error response (4xx, 5xx): `detail` is the first error as `<field>: <message>`, `errors`
    lists them all. An invalid constitution adds `file` and `line` (the YAML line at fault)."""

    model_config = ConfigDict(extra="allow")

    detail: str
    errors: list[ErrorItem] = Field(min_length=1)


class GenerateResponse(BaseModel):
    job_id: int
    n_prompts: int
    constitution_version: str


class JobCounts(BaseModel):
    """A job's prompts by state, and its pairs that carry a quality flag."""

    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    flagged: int = 0


class JobUsage(BaseModel):
    """What a job's pairs have cost so far, and its budget."""

    generated_tokens: int = Field(
        description="Tokens its pairs generated (every answer, critique and revision)."
    )
    prompt_tokens: int = Field(description="Prompt tokens the engine processed for its pairs.")
    engine_seconds: float = Field(
        description="Its pairs' shares of the engines' time: while n prompts are in flight on a "
        "worker each accrues 1/n of every second, so this adds up to the time engines spent on it."
    )
    cost: float | None = Field(
        description="engine_seconds / 3600 x CAI_GPU_HOUR_COST; null where that is not set."
    )
    max_generated_tokens: int | None = Field(description="The job's budget (POST /generate), if any.")
    budget_reached: bool = Field(description="Whether generated_tokens reached max_generated_tokens.")


class JobOut(BaseModel):
    id: int
    status: str
    constitution: str
    constitution_version: str | None
    model: str
    revisions: int
    sampling: Sampling
    options: GenerationMode | CompareOptions | CalibrateOptions = Field(
        description="mode, n, scorer, verify (see POST /generate); an evaluation's comparison job: "
        "mode `compare`, the baseline model and the judge; a judge's calibration (POST "
        "/judges/calibrate): mode `calibrate` and the judge."
    )
    metadata: dict[str, Any]
    n_prompts: int
    counts: JobCounts
    pairs_per_s: float | None
    eta_s: float | None
    created_at: datetime
    cancelled_at: datetime | None
    stop_reason: str | None = Field(
        description="Why the service stopped the job, e.g. `budget: max_generated_tokens N reached` "
        "(its unclaimed prompts were cancelled); null for a job that ran out or that was cancelled."
    )
    usage: JobUsage


class PromptOut(BaseModel):
    id: int
    position: int = Field(description="Index of the prompt in the `POST /generate` request.")
    status: str
    attempts: int
    last_error: str | None
    pair_id: int | None
    flags: list[str] = Field(
        default_factory=list,
        description="Its pair's quality flags: why a done prompt's pair is left out of exports "
        "(e.g. no_harm_found: the no-harm check found nothing to critique, the answer was kept).",
    )
    messages: list[dict[str, Any]]
    started_at: datetime | None
    finished_at: datetime | None


class PromptPage(BaseModel):
    items: list[PromptOut]
    next_cursor: str | None


class ReviewOut(BaseModel):
    version: int
    status: Literal["approved", "rejected"]
    reviewer: str = Field(description="The name of the API key that reviewed.")
    created_at: datetime
    chosen: str | None = Field(description="The chosen text in force after this version (None: generated).")
    edited: bool = Field(description="This version changed the chosen text.")


class PairOut(BaseModel):
    id: int
    job_id: int | None
    prompt_id: int | None
    source: str
    constitution: str | None
    constitution_version: str | None
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str
    flags: list[str] = Field(
        description="Quality flags (a flagged pair is left out unless include_flagged=true): "
        + " ".join(f"`{name}`: {text}" for name, text in FLAGS.items())
    )
    model: str | None
    created_at: datetime
    scores: dict[str, float] | None = Field(
        None, description="{chosen, rejected} where a scorer scored them."
    )
    preference: dict[str, Any] | None = Field(
        None, description="p_chosen, scorer, model, principles, orders: how a scorer judged the pair."
    )
    margin: float | None = Field(None, description="log(p_chosen / (1 - p_chosen)).")
    length_ratio: float | None = Field(
        None,
        description="Characters of chosen / characters of rejected, as generated (None: rejected is "
        "empty). Filter with min_length_ratio / max_length_ratio.",
    )
    principles: list[str] = Field(default_factory=list)
    trajectory: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    review: Literal["approved", "rejected"] | None = Field(
        None, description="The latest human review; None where no one reviewed the pair."
    )
    reviewed_chosen: str | None = Field(
        None, description="A reviewer's latest edit of `chosen`, used by exports (`chosen` stays as made)."
    )
    reviews: list[ReviewOut] | None = Field(None, description="Every review version, oldest first.")


class PairPageQuery(PairFilter):
    """`GET /pairs`: the filters, and a page."""

    model_config = ConfigDict(strict=False)  # a query string carries text only

    cursor: Cursor | None = None
    limit: int = Field(50, ge=1, description="Rows per page (at most CAI_PAGE_SIZE_MAX).")


class ExportQuery(PairFilter):
    """`GET /export`: the filters, and the file's format, style and split."""

    model_config = ConfigDict(strict=False)  # a query string carries text only

    format: Literal["jsonl", "parquet", "hf"] = Field(
        "jsonl",
        description="`jsonl`, `parquet`, or `hf`: a Hugging Face Hub dataset folder as a tar stream "
        "(`data/train-*.parquet`, `data/test-*.parquet` split by prompt at `test_fraction` and sharded "
        "by `shard_mb`, and a README.md dataset card saying how the data was made).",
    )
    license: str = Field(
        "other",
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9.+-]*$",
        description="`format=hf`: the card's license, a Hub license id (apache-2.0, mit, cc-by-4.0, other).",
    )
    shard_mb: float = Field(
        500, gt=0, le=10_000, description="`format=hf`: megabytes of Parquet per shard, at most (about)."
    )
    style: Literal["standard", "conversational", "openai"] = Field(
        "conversational",
        description="TRL's standard (strings) or conversational (messages) rows, or `openai`: OpenAI's "
        "preference fine-tuning JSONL (`input.messages`, `preferred_output`, `non_preferred_output`; "
        "`format=jsonl` only, no metadata fields).",
    )
    split: Literal["train", "test", "all"] = Field(
        "all",
        description="Deterministic split by prompt (a hash of its messages): every pair of a prompt "
        "is on one side, the same side as in a training job with `eval_fraction` = `test_fraction`.",
    )
    test_fraction: float = Field(0.1, ge=0, le=1, description="Share of prompts in the test split.")
    metadata: bool = Field(
        False,
        description="Add prompt_id, messages, score_chosen, score_rejected, chosen_model, "
        "rejected_model, id, constitution, principles, source, flags, ... (always in `format=hf`).",
    )

    dedup: Literal["none", "prompt"] = Field(
        "none",
        description="`prompt`: one pair per group of near-duplicate prompts (the same normalised text, "
        "or word 3-gram Jaccard >= 0.7 by MinHash), across jobs: the one the scorer preferred by the "
        "largest margin, else the earliest.",
    )

    @field_validator("style")
    @classmethod
    def _openai_is_jsonl(cls, style: str, info: ValidationInfo) -> str:
        if style == "openai" and info.data.get("format", "jsonl") != "jsonl":
            raise ValueError("style=openai is a JSON Lines format: use format=jsonl")
        return style


class DecontaminateIn(StrictJson):
    """`POST /datasets/decontaminate`: mark the pairs whose prompts overlap a benchmark's."""

    model_config = ConfigDict(extra="forbid")

    benchmark: PairFilter = Field(
        description="The evaluation set, as stored pairs (imported with /datasets/import): a filter "
        "that names `import_id` or `source`. Its own pairs are never marked.",
        # Stated in the document too: a filter naming neither is refused.
        json_schema_extra={
            "anyOf": [
                {"required": ["import_id"], "properties": {"import_id": {"type": "integer"}}},
                {"required": ["source"], "properties": {"source": {"type": "string"}}},
            ]
        },
    )
    pairs: PairFilter = Field(
        default_factory=lambda: PairFilter(include_flagged=True),
        description="The pairs to check (default: every pair, flagged ones included).",
    )
    n: int = Field(8, ge=3, le=50, description="Words in a run: a shared run of n words is an overlap.")

    @field_validator("benchmark")
    @classmethod
    def _names_a_set(cls, benchmark: PairFilter) -> PairFilter:
        if benchmark.import_id is None and benchmark.source is None:
            raise ValueError("name the evaluation set: import_id or source")
        return benchmark


class DecontaminateOut(BaseModel):
    benchmark_prompts: int = Field(description="Distinct prompts of the evaluation set.")
    checked: int = Field(description="Pairs checked (the benchmark's own left out).")
    contaminated: int = Field(
        description="Pairs whose prompt overlaps the benchmark (flagged now or before)."
    )
    newly_flagged: int = Field(description="Of those, pairs that did not carry `contaminated` yet.")
    examples: list[dict[str, Any]] = Field(
        description="Up to 20: pair_id and the run of words it shares with the benchmark."
    )


class PairPage(BaseModel):
    items: list[PairOut]
    next_cursor: str | None


class ConstitutionOut(BaseModel):
    name: str
    version: str
    description: str
    body: str | None = None
    spec: dict[str, Any] | None = None
    versions: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = Field(
        None, description="Set when the file on disk is invalid (last good version served)."
    )


class ConstitutionVersionOut(BaseModel):
    name: str
    version: str
    body: str
    first_used_at: datetime


class EngineOccupancyOut(BaseModel):
    """How full a generation worker keeps its engine: what it is told to hold, and what the engine
    says it holds (None where it does not say: a remote server without `/metrics`)."""

    in_flight_target: int | None = Field(
        None, description="Trajectories the worker keeps in flight now (fixed, or steered by the rest)."
    )
    running: int | None = Field(None, description="Sequences in the engine's batch.")
    waiting: int | None = Field(None, description="Requests queued inside the engine.")
    kv_cache_usage: float | None = Field(None, description="Fraction (0-1) of its KV cache in use.")
    max_num_seqs: int | None = Field(None, description="The most sequences it batches at once.")


class WorkerOut(BaseModel):
    id: str
    kind: str
    host: str
    pid: int
    model: str | None
    in_flight: int
    tokens_per_s: float
    engine: EngineOccupancyOut | None = Field(None, description="A generation worker's engine occupancy.")
    healthy: bool = Field(description="False while the worker reports a problem (e.g. its engine is down).")
    problem: str | None = None
    stats: dict[str, Any]
    started_at: datetime
    heartbeat_at: datetime


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "error"] = Field(
        description="degraded: a live worker reports a problem, or work waits with no live worker of "
        "its kind; error: no database (503)."
    )
    database: bool
    workers: dict[str, int] | None = Field(None, description="Live workers by kind (absent on error).")
    unhealthy_workers: int | None = Field(None, description="Present when degraded.")
    problems: list[dict[str, Any]] | None = Field(
        None, description="Each unhealthy worker's problem: only to callers with a valid key."
    )
    error: str | None = Field(None, description="The database error: only to callers with a valid key.")


# --- training -------------------------------------------------------------------------------------


class EvaluationOut(BaseModel):
    id: int
    status: str = Field(description="queued, running (reward accuracy), comparing (win rate), done, failed.")
    request: dict[str, Any]
    win_rate: dict[str, Any] | None = Field(
        None,
        description="wins, ties, losses, n = wins + ties + losses (finished comparisons), rate = "
        "(wins + ties/2) / n, ci95 (Wilson), failed (comparisons that failed for good, not in n), open, "
        "cancelled, prompts (all of them); length_controlled: {rate, ci95, length_coefficient, "
        "length_term, n}, the win rate at no length difference (the promotion gate's figure); lengths: "
        "mean answer lengths in characters; judges: each judge's own counts and rate. The trained model "
        "against its base, judged in both orders by a judge that is not the trained model. Live while "
        "comparing. "
        "prompts_in_training: {n, prompts}, how many of the compared prompts are prompts of the trained "
        "model's training pairs (its lineage's included; 0 for the default held-out prompts), and "
        "the first 50 of them.",
    )
    reward_accuracy: dict[str, Any] | None = Field(
        None, description="held_out (from training) and external: accuracy and mean margin, base and trained."
    )
    promotion: dict[str, Any] | None = None
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None


class ServeOut(BaseModel):
    """How to serve a finished run's model to tools outside the service (an OpenAI-compatible API)."""

    command: str = Field(
        description="Run on a host with vLLM and access to the artifact: `vllm serve` on the model "
        "(merged weights, or the base model with the LoRA adapter). `--port`, `--host` and `--print` "
        "(the vLLM command line instead) are options."
    )
    base_url: str = Field(
        description="The OpenAI base URL the server answers on (`/v1/models`, `/v1/chat/completions`)."
    )
    model: str = Field(description="The model name to call it by (`train-<id>`).")


class TrainJobOut(BaseModel):
    id: int
    status: str
    base_model: str
    dataset: dict[str, Any]
    params: dict[str, Any]
    policy: str | None
    n_train_pairs: int | None
    n_eval_pairs: int | None
    step: int
    total_steps: int | None
    eta_s: float | None
    latest_metrics: dict[str, Any] | None
    eval_before: dict[str, Any] | None
    eval_after: dict[str, Any] | None
    artifact: str | None
    model: str | None = Field(description="Use as `model` in POST /generate once succeeded.")
    serve: ServeOut | None = Field(
        None,
        description="Once succeeded: how to serve the model over an OpenAI-compatible API; else null. "
        'Null for a reward model too: it scores, as a best_of_n job\'s `"scorer": {"kind": "reward_model", '
        '"model": "train:<id>"}`.',
    )
    evaluation: EvaluationOut | None = Field(
        None, description="The latest evaluation: win rate against the base model, reward accuracy."
    )
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
