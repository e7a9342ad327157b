"""Scorers that run a model with torch in this process: a reward model, and a DPO-trained model's
implicit reward against its reference.

Both load their models lazily, once (in a thread), on CUDA where present, else on the CPU in
float32. Concurrent `score` calls that arrive within a few milliseconds are run as one batch, and
every forward pass runs in a thread, so the event loop (and the vLLM engine beside it) stays free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from workers.generation.engines import PromptTooLong
from workers.scoring.base import Comparison, Messages, sigmoid

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

BATCH_WINDOW_S = 0.005


class ScorerError(ValueError):
    """A scorer's model cannot score this input or cannot be used at all (the message says why)."""


class MicroBatcher(Generic[Item, Result]):
    """Collects the items of concurrent `submit` calls for `window_s`, then runs them through
    `run` (a blocking function of a list of items, called in a thread) in batches of at most
    `max_items`. Items that arrive while a batch runs make the next batch. One batch runs at a time.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], list[Result]],
        *,
        window_s: float = BATCH_WINDOW_S,
        max_items: int = 64,
    ) -> None:
        self._run = run
        self._window_s = window_s
        self._max_items = max_items
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # batches run so far (tests and metrics)

    async def submit(self, items: list[Item]) -> list[Result]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests run several): start afresh on it
            self._loop, self._pending, self._drainer = loop, [], None
        futures: list[asyncio.Future[Result]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        await asyncio.sleep(self._window_s)
        while self._pending:
            batch, self._pending = self._pending[: self._max_items], self._pending[self._max_items :]
            live = [(item, future) for item, future in batch if not future.done()]  # callers gone
            if not live:
                continue
            try:
                results = await asyncio.to_thread(self._run, [item for item, _ in live])
            except BaseException as exc:
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    for _, future in self._pending:
                        future.cancel()
                    raise
            else:
                self.batches += 1
                for (_, future), result in zip(live, results, strict=True):
                    if not future.done():
                        future.set_result(result)


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _max_length(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(text, "max_position_embeddings", None)
    return int(length) if isinstance(length, int) and length > 0 else None


class _LazyModel:
    """Loads once, in whichever thread asks first; later callers wait for that load."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False

    async def ensure_loaded(self) -> None:
        if not self._loaded:
            await asyncio.to_thread(self._load_once)

    def _load_once(self) -> None:
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    def _load(self) -> None:
        raise NotImplementedError


# --- reward model --------------------------------------------------------------------------------


class RewardModelScorer(_LazyModel):
    """A Hugging Face sequence-classification reward model (one logit) from a local folder.

    A response's score is the model's logit for the conversation plus the response as the
    assistant's turn, rendered by the model's own chat template. Rows of a batch are right-padded
    with the model's pad token, which its head skips (it reads the last token that is not padding),
    so a batch gives each row's unpadded score; without a pad token each row runs alone.
    """

    kind = "reward_model"

    def __init__(
        self,
        path: str | Path,
        *,
        model: str | None = None,
        max_batch_tokens: int = 16384,
        window_s: float = BATCH_WINDOW_S,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.model = model or str(path)
        self.max_batch_tokens = max_batch_tokens
        self._tokenizer: Any = None
        self._model: Any = None
        self._device: Any = None
        self.max_length: int | None = None
        self.batcher: MicroBatcher[list[int], float] = MicroBatcher(self._forward, window_s=window_s)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._device = _device()
        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        dtype = "auto" if self._device.type == "cuda" else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtype)
        if model.config.num_labels != 1:
            raise ScorerError(
                f"{self.model}: a reward model has one output; this one has {model.config.num_labels}"
            )
        if getattr(self._tokenizer, "chat_template", None) is None:
            raise ScorerError(f"{self.model}: the reward model's tokenizer has no chat template")
        self._model = model.to(self._device).eval()
        self.max_length = _max_length(model.config)
        log.info("reward model %s loaded on %s (%s)", self.model, self._device, model.dtype)

    def encode(self, conversation: Messages, response: str) -> list[int]:
        """Token ids of the conversation with `response` as the assistant's turn (chat template)."""
        messages = [*conversation, {"role": "assistant", "content": response}]
        encoded = self._tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=False
        )
        ids = list(encoded["input_ids"])
        if self.max_length is not None and len(ids) > self.max_length:
            raise PromptTooLong(
                f"the conversation and response are {len(ids)} tokens; the reward model {self.model} "
                f"reads at most {self.max_length}"
            )
        return ids

    async def score(self, conversation: Messages, responses: list[str]) -> list[float]:
        await self.ensure_loaded()
        rows = [self.encode(conversation, response) for response in responses]
        return await self.batcher.submit(rows)

    async def compare(self, conversation: Messages, first: str, second: str, *, seed: int) -> Comparison:
        a, b = await self.score(conversation, [first, second])
        return Comparison(sigmoid(a - b), [], 1, [{"scores": [a, b]}])

    def _forward(self, rows: list[list[int]]) -> list[float]:
        import torch

        pad = self._model.config.pad_token_id
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        scores: list[float] = [0.0] * len(rows)
        start = 0
        with torch.inference_mode():
            while start < len(order):
                # Rows sorted by length: the batch grows while its padded size fits the budget.
                end = start + 1
                while (
                    pad is not None
                    and end < len(order)
                    and (end + 1 - start) * len(rows[order[end]]) <= self.max_batch_tokens
                ):
                    end += 1
                batch = [rows[i] for i in order[start:end]]
                width = max(len(row) for row in batch)
                input_ids = torch.full((len(batch), width), pad if pad is not None else 0, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, row in enumerate(batch):
                    input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                    attention_mask[r, : len(row)] = 1
                logits = self._model(
                    input_ids=input_ids.to(self._device), attention_mask=attention_mask.to(self._device)
                ).logits
                for i, value in zip(order[start:end], logits[:, 0].float().tolist(), strict=True):
                    scores[i] = value
                start = end
        return scores


# --- implicit DPO reward -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A DPO-trained model's folder, its reference's folder (as trained against) and beta."""

    policy: Path
    reference: str
    beta: float


def read_training_config(folder: str | Path) -> TrainedModel:
    """`base_model` and `params.beta` from a training job's artifact (`training_config.json`)."""
    path = Path(folder) / "training_config.json"
    try:
        record = json.loads(path.read_text())
        return TrainedModel(Path(folder), str(record["base_model"]), float(record["params"]["beta"]))
    except FileNotFoundError as exc:
        raise ScorerError(f"{folder}: no training_config.json, so not a trained model's folder") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ScorerError(f"{path}: no base_model and params.beta ({exc!r})") from exc


class ImplicitRewardScorer(_LazyModel):
    """The DPO implicit reward `beta * (log pi(y|x) - log pi_ref(y|x))` of a trained model.

    Tokenization and log-probs are the trainer's own (`tokenize_pair`, `collate`,
    `sequence_logps`): a response's log-prob sums its tokens after the chat-template prompt,
    end-of-turn included, exactly as during training. The policy's tokenizer serves both models
    (DPO trains a copy of the reference). Responses go two at a time as the trainer's pairs.
    """

    kind = "implicit"

    def __init__(
        self,
        policy_path: str | Path,
        reference_path: str | Path,
        beta: float,
        *,
        model: str | None = None,
        max_length: int | None = None,
        max_batch_tokens: int = 16384,
        window_s: float = BATCH_WINDOW_S,
    ) -> None:
        super().__init__()
        self.policy_path = Path(policy_path)
        self.reference_path = Path(reference_path)
        self.beta = float(beta)
        self.model = model or str(policy_path)
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens
        self._tokenizer: Any = None
        self._policy: Any = None
        self._reference: Any = None
        self._device: Any = None
        self._pad_token_id = 0
        self.batcher: MicroBatcher[Any, tuple[float, float]] = MicroBatcher(self._forward, window_s=window_s)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._device = _device()
        dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        self._tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        models = []
        for path in (self.policy_path, self.reference_path):
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
            models.append(lm.to(self._device).eval())
        self._policy, self._reference = models
        if self.max_length is None:
            self.max_length = _max_length(self._policy.config) or 1 << 20
        pad = self._tokenizer.pad_token_id
        self._pad_token_id = pad if pad is not None else (self._tokenizer.eos_token_id or 0)
        log.info(
            "implicit reward of %s against %s loaded on %s", self.model, self.reference_path, self._device
        )

    def tokenize(self, conversation: Messages, responses: list[str]) -> list[Any]:
        """The responses as the trainer's tokenized pairs: (0, 1), (2, 3), ...; an odd last one is
        paired with itself."""
        from workers.training.data import PairExample, tokenize_pair

        pairs = []
        for start in range(0, len(responses), 2):
            first = responses[start]
            second = responses[start + 1] if start + 1 < len(responses) else first
            example = PairExample(prompt=conversation, chosen=first, rejected=second)
            pair = tokenize_pair(self._tokenizer, example, self.max_length)
            if pair is None:
                raise PromptTooLong(
                    f"the conversation leaves no room for a response in {self.max_length} tokens "
                    f"({self.model})"
                )
            pairs.append(pair)
        return pairs

    async def score(self, conversation: Messages, responses: list[str]) -> list[float]:
        await self.ensure_loaded()
        results = await self.batcher.submit(self.tokenize(conversation, responses))
        return [reward for pair in results for reward in pair][: len(responses)]

    async def compare(self, conversation: Messages, first: str, second: str, *, seed: int) -> Comparison:
        a, b = await self.score(conversation, [first, second])
        return Comparison(sigmoid(a - b), [], 1, [{"scores": [a, b]}])

    def _forward(self, pairs: list[Any]) -> list[tuple[float, float]]:
        import torch

        from workers.training.data import collate
        from workers.training.dpo import sequence_logps

        unpad = self._device.type != "cuda"  # as the trainer: on a CPU each row runs at its own length
        results: list[tuple[float, float]] = []
        start = 0
        with torch.inference_mode():
            while start < len(pairs):
                end, used = start + 1, pairs[start].num_tokens
                while end < len(pairs) and used + pairs[end].num_tokens <= self.max_batch_tokens:
                    used += pairs[end].num_tokens
                    end += 1
                batch = {
                    k: v.to(self._device) for k, v in collate(pairs[start:end], self._pad_token_id).items()
                }
                policy = sequence_logps(self._policy, **batch, unpad=unpad).float()
                reference = sequence_logps(self._reference, **batch, unpad=unpad).float()
                rewards = (self.beta * (policy - reference)).tolist()
                n = end - start
                results += [(rewards[i], rewards[n + i]) for i in range(n)]
                start = end
        return results
