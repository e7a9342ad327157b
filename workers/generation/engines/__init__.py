"""Chat engines behind one small interface (`base.Engine`): in-process vLLM (`VLLMEngine`,
`vllm_local.py`) or a remote OpenAI-compatible server (`OpenAIEngine`, `openai_http.py`), and
`make_engine`, which builds the one the settings name.

The critique-and-revise loop calls `chat(messages, sampling, request_id)` and gets text, a finish
reason and token counts, without knowing which engine it has. `stats()` gives request counters and
the engine's occupancy (`running`, `waiting`, `kv_cache_usage`, `max_num_seqs`, None where
unknown); `refresh_stats()`, called periodically, fetches what a remote server must be asked for.
A conversation that cannot fit the model's context raises `PromptTooLong` (never retryable); any
other failed request raises `EngineError`, or `EngineUnavailable` when the engine itself is down.
Engines are built inside functions only: vLLM spawns worker processes, which re-import the entry
point, so nothing here starts at import time.

For the AI-feedback judge (`workers.scoring`) both engines also answer
`option_logprobs(messages, assistant_prefix, options, request_id)`: the log-probs of one-token
options (`A`, `B`) as the next token after an assistant turn started with `assistant_prefix`; and
`continue_chat(messages, assistant_prefix, sampling, request_id)`: `chat` with the answer started
by `assistant_prefix` (the judge's chain of thought). They run on the same engine as generation, so
judge requests join the same continuous batch.
"""

from __future__ import annotations

from cai_dpo.core.settings import Settings
from workers.generation.engines.base import (
    ChatResult,
    Engine,
    EngineError,
    EngineStats,
    EngineUnavailable,
    FinishReason,
    Messages,
    OptionNotOneToken,
    PromptTooLong,
    Sampling,
)
from workers.generation.engines.openai_http import OpenAIEngine
from workers.generation.engines.vllm_local import VLLMEngine, option_token_ids

__all__ = [
    "ChatResult",
    "Engine",
    "EngineError",
    "EngineStats",
    "EngineUnavailable",
    "FinishReason",
    "Messages",
    "OpenAIEngine",
    "OptionNotOneToken",
    "PromptTooLong",
    "Sampling",
    "VLLMEngine",
    "make_engine",
    "option_token_ids",
]


def make_engine(settings: Settings, model: str, trained_path: str | None = None) -> Engine:
    """The engine `settings.engine` names, for `model` (a name `resolve_model` understands)."""
    if settings.engine == "openai":
        return OpenAIEngine(
            settings.openai_base_url,
            settings.openai_model or model,
            api_key=settings.openai_api_key,
            concurrency=settings.openai_concurrency
            or (2 * settings.openai_max_num_seqs if settings.openai_max_num_seqs else 32),
            timeout_seconds=settings.openai_timeout_seconds,
            max_retries=settings.openai_max_retries,
            max_num_seqs=settings.openai_max_num_seqs,
        )
    from cai_dpo.core.model_sources import resolve_model

    return VLLMEngine(
        resolve_model(model, settings, trained_path=trained_path),
        name=model,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        memory_fraction=settings.vllm_memory_fraction,
        max_model_len=settings.vllm_max_model_len,
        enforce_eager=settings.vllm_enforce_eager,
        kv_cache_memory_bytes=int(settings.vllm_kv_cache_gib * 2**30) if settings.vllm_kv_cache_gib else None,
        dtype=settings.vllm_dtype,
        load_format=settings.vllm_load_format,
        max_num_seqs=settings.vllm_max_num_seqs,
        max_num_batched_tokens=settings.vllm_max_num_batched_tokens,
        data_parallel_size=settings.vllm_data_parallel_size,
    )
