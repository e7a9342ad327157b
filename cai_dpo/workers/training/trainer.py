"""The DPO training loop: one function from pairs and a model folder to a merged Hugging Face model.

`run_training` reads top to bottom: tokenize, load, reference log-probs once, then per optimizer
step: batch, forward, loss, backward, clip, step, log, checkpoint; then evaluate and save. It knows
nothing of the database; the worker passes hooks for progress, checkpoints and cancellation.

Resuming is one branch at the start: a checkpoint in `output_dir/checkpoint` holds the trainable
weights, optimizer state, step, RNG state, metric history and the reference log-probs. The data
order and learning rate are pure functions of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cai_dpo.core.training_params import TrainParams
from cai_dpo.workers.training.data import (
    PairExample,
    TokenizedPair,
    collate,
    collate_shared_prompt,
    fingerprint,
    tokenize_pairs,
)
from cai_dpo.workers.training.dpo import (
    batch_metrics,
    dpo_loss,
    pair_logps,
    sequence_logps,
    supports_shared_prompt,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"


def _never() -> bool:
    return False


class _Clock:
    """Seconds spent in each phase of a run, for TrainResult.timings."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now


@dataclass
class TrainHooks:
    """Callbacks into the caller; every one is optional."""

    on_step: Callable[[int, int, dict[str, float]], None] = lambda step, total, metrics: None
    on_eval: Callable[[str, dict[str, float]], None] = lambda when, metrics: None
    on_checkpoint: Callable[[int, Path], None] = lambda step, path: None
    # Checked after every optimizer step (and once before the first): True stops without writing
    # anything more, since another worker may own the job by then.
    should_stop: Callable[[], bool] = _never


@dataclass
class TrainResult:
    status: Literal["completed", "stopped"]
    step: int
    total_steps: int
    model_dir: Path | None
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    last_metrics: dict[str, float] | None
    data: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# --- pure functions of the step ---------------------------------------------------------------


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup climbs linearly to `peak` without a wasted zero-lr first step; then linear or cosine
    decay toward zero at `total_steps` (as transformers' schedules after their warmup).
    """
    if step < warmup_steps:
        return peak * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def steps_per_epoch(n_pairs: int, pairs_per_step: int) -> int:
    return math.ceil(n_pairs / pairs_per_step)


def total_steps_for(params: TrainParams, n_pairs: int) -> int:
    return params.max_steps or params.epochs * steps_per_epoch(n_pairs, params.pairs_per_step)


def pairs_for_step(step: int, n_pairs: int, pairs_per_step: int, seed: int) -> list[int]:
    """Indices of the training pairs of optimizer step `step`: a seeded shuffle per epoch, sliced."""
    per_epoch = steps_per_epoch(n_pairs, pairs_per_step)
    epoch, position = divmod(step, per_epoch)
    order = list(range(n_pairs))
    random.Random(f"dpo-order:{seed}:{epoch}").shuffle(order)
    return order[position * pairs_per_step : (position + 1) * pairs_per_step]


# --- model pieces ------------------------------------------------------------------------------


def _load_model(model_path: Path, params: TrainParams, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model.config.use_cache = False
    # As TRL (disable_dropout=True): DPO compares log-probs of the same model, dropout only adds noise.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    if params.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = params.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model


def _reference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    # With LoRA the reference is the base model: the adapter switched off, no second copy held.
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward_pairs(
    model: nn.Module, pairs: list[TokenizedPair], pad_token_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Log-probs of the pairs' answers (chosen then rejected, [2n]) and their lengths in tokens."""
    # On a CPU a padded batch pays for its padding in full and batching gains little: rows run alone.
    unpad = device.type == "cpu"
    if supports_shared_prompt(model):
        packed = {k: v.to(device) for k, v in collate_shared_prompt(pairs, pad_token_id).items()}
        with _autocast(device):
            logps = pair_logps(model, packed, unpad=unpad)
        return logps.float(), packed["response_lengths"]
    batch = {k: v.to(device) for k, v in collate(pairs, pad_token_id).items()}
    with _autocast(device):
        logps = sequence_logps(model, **batch, unpad=unpad)
    return logps.float(), batch["loss_mask"].sum(dim=1)


@torch.no_grad()
def score_pairs(
    model: nn.Module, pairs: list[TokenizedPair], batch_size: int, pad_token_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Chosen and rejected log-probs of every pair without gradients (reference and evaluation)."""
    was_training = model.training
    model.eval()
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    # Length-sorted batches waste less on padding; results go back to their pair's index.
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].num_tokens)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        logps, _ = _forward_pairs(model, [pairs[i] for i in indices], pad_token_id, device)
        chosen[indices], rejected[indices] = logps.cpu().split(len(indices))
    model.train(was_training)
    return chosen, rejected


def _pair_losses(
    logps: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, lengths: Tensor, params: TrainParams
) -> tuple[Tensor, Tensor, Tensor]:
    """dpo_loss on [chosen..., rejected...] log-probs and answer lengths, with the run's settings."""
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        params.beta,
        params.loss_type,
        params.label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def accumulate_step(
    model: nn.Module,
    pairs: list[TokenizedPair],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    params: TrainParams,
    pad_token_id: int,
    device: torch.device,
) -> dict[str, float]:
    """Forward and backward over one optimizer step's pairs, in micro-batches of `params.batch_size`.

    Each micro-batch adds sum(losses) / len(pairs) to the gradient, so the gradient is the mean over
    the whole step whatever the split (2 × 2 pairs == 1 × 4 pairs). Returns the step's metrics.
    """
    columns: list[tuple[Tensor, ...]] = []
    for start in range(0, len(pairs), params.batch_size):
        micro = slice(start, start + params.batch_size)
        logps, lengths = _forward_pairs(model, pairs[micro], pad_token_id, device)
        losses, chosen_rewards, rejected_rewards = _pair_losses(
            logps, ref_chosen[micro].to(device), ref_rejected[micro].to(device), lengths, params
        )
        (losses.sum() / len(pairs)).backward()
        columns.append((losses.detach(), chosen_rewards, rejected_rewards, *logps.detach().chunk(2)))
    return batch_metrics(*(torch.cat(column) for column in zip(*columns, strict=True)))


def _eval_metrics(
    pairs: list[TokenizedPair], policy: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor], params: TrainParams
) -> dict[str, float]:
    logps = torch.cat(policy)
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    losses, chosen_rewards, rejected_rewards = _pair_losses(logps, *ref, lengths, params)
    return batch_metrics(losses, chosen_rewards, rejected_rewards, *policy)


# --- checkpoint and artifact --------------------------------------------------------------------


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    # named_parameters lists tied weights (embedding = LM head) once, which safetensors requires.
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written folder into place; a crash leaves either the old or the new one."""
    previous = target.with_name(f".{target.name}-old")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    if previous.exists():
        shutil.rmtree(previous)


@dataclass
class _RunState:
    """What a checkpoint restores besides weights, optimizer and RNG."""

    step: int
    history: list[dict[str, float]]
    eval_before: dict[str, float] | None
    ref: dict[str, Tensor]  # reference log-probs: train_chosen, train_rejected, eval_chosen, eval_rejected


def _save_checkpoint(
    output_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run: _RunState,
    identity: dict[str, Any],
) -> Path:
    staging = output_dir / f".{CHECKPOINT_DIR}-tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file(_trainable_state(model), staging / "trainable.safetensors")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"torch": torch.get_rng_state(), "cuda": cuda_rng}, staging / "rng.pt")
    torch.save(run.ref, staging / "reference_logps.pt")
    state = {"step": run.step, "history": run.history, "eval_before": run.eval_before, **identity}
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    target = output_dir / CHECKPOINT_DIR
    _replace_dir(staging, target)
    return target


def _checkpoint_path(output_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}-old"):  # -old: a crash between _replace_dir's renames
        if (output_dir / name / "state.json").exists():
            return output_dir / name
    return None


def _resume(
    output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, identity: dict[str, Any]
) -> _RunState | None:
    """Load the last checkpoint into model and optimizer; None when there is none."""
    path = _checkpoint_path(output_dir)
    if path is None:
        return None
    state = json.loads((path / "state.json").read_text())
    if any(state[key] != value for key, value in identity.items()):
        raise ValueError(f"{path} belongs to a run with other parameters or data; refusing to resume from it")
    device = next(model.parameters()).device
    weights = load_file(path / "trainable.safetensors", device=str(device))
    mismatch = set(weights) ^ {name for name, p in model.named_parameters() if p.requires_grad}
    if mismatch:
        raise ValueError(f"{path}: trainable weights do not match the model: {sorted(mismatch)[:5]}")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    ref = torch.load(path / "reference_logps.pt", weights_only=True)
    log.info("resuming from %s at step %d", path, state["step"])
    return _RunState(state["step"], state["history"], state["eval_before"], ref)


def _save_artifact(
    output_dir: Path, model: nn.Module, tokenizer: Any, params: TrainParams, record: dict[str, Any]
) -> Path:
    """Write the merged model, tokenizer (with its chat template) and training record as one HF folder."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(getattr(torch, params.save_dtype))
    model.config.use_cache = True
    staging = output_dir / f".{MODEL_DIR}-tmp"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    history = record.pop("history")
    (staging / "training_config.json").write_text(
        json.dumps({"params": params.model_dump(), **record}, indent=1)
    )
    (staging / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    target = output_dir / MODEL_DIR
    _replace_dir(staging, target)
    return target


def _finished_result(model_dir: Path) -> TrainResult:
    record = json.loads((model_dir / "training_config.json").read_text())
    steps = record["steps"]
    return TrainResult(
        "completed", steps, steps, model_dir, record["eval_before"], record["eval_after"],
        record["last_metrics"], record["data"],
    )  # fmt: skip


def _prepare_data(
    tokenizer: Any, train_pairs: list[PairExample], eval_pairs: list[PairExample], params: TrainParams
) -> tuple[list[TokenizedPair], list[TokenizedPair], dict[str, Any]]:
    train, train_dropped = tokenize_pairs(tokenizer, train_pairs, params.max_length, params.max_prompt_length)
    evals, eval_dropped = tokenize_pairs(tokenizer, eval_pairs, params.max_length, params.max_prompt_length)
    if not train:
        raise ValueError("no training pair has a response token left within max_length")
    summary = {
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        "dropped_by_truncation": len(train_dropped) + len(eval_dropped),
        "train_tokens": sum(p.num_tokens for p in train),
        "fingerprint": fingerprint(train + evals),
    }
    return train, evals, summary


# --- the loop -----------------------------------------------------------------------------------


def run_training(
    params: TrainParams,
    *,
    model_path: Path,
    train_pairs: list[PairExample],
    eval_pairs: list[PairExample],
    output_dir: Path,
    hooks: TrainHooks | None = None,
    checkpoint_steps: int = 50,
    device: str | None = None,
) -> TrainResult:
    """Train with DPO and write `output_dir/model`; resume from `output_dir/checkpoint` if there is one.

    `checkpoint_steps` is the worker's default, used when `params.checkpoint_steps` is None. A call
    on an `output_dir` that already holds the finished model returns its record without training.
    """
    from transformers import AutoTokenizer

    hooks, output_dir = hooks or TrainHooks(), Path(output_dir)
    if (output_dir / MODEL_DIR / "training_config.json").exists():
        return _finished_result(output_dir / MODEL_DIR)
    output_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    every = params.checkpoint_steps or checkpoint_steps
    clock = _Clock()

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, evals, data = _prepare_data(tokenizer, train_pairs, eval_pairs, params)
    total_steps = total_steps_for(params, len(train))
    warmup_steps = math.ceil(params.warmup_ratio * total_steps)
    identity = {
        "params": params.model_dump(exclude={"checkpoint_steps"}),
        "data_fingerprint": data["fingerprint"],
    }
    clock.lap("tokenize_s")

    torch.manual_seed(params.seed)
    model = _load_model(model_path, params, dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=params.learning_rate, weight_decay=params.weight_decay, fused=True
    )
    clock.lap("load_s")

    run = _resume(output_dir, model, optimizer, identity)
    resumed_from_step = run.step if run is not None else None
    if run is None:  # reference log-probs once, from the model before any update
        with _reference_context(model):
            ref_train = score_pairs(model, train, 2 * params.batch_size, pad_id, dev)
            ref_eval = score_pairs(model, evals, 2 * params.batch_size, pad_id, dev)
        ref = {"train_chosen": ref_train[0], "train_rejected": ref_train[1]}
        ref |= {"eval_chosen": ref_eval[0], "eval_rejected": ref_eval[1]}
        # Before any update the policy is the reference: its eval needs no second pass.
        eval_before = _eval_metrics(evals, ref_eval, ref_eval, params) if evals else None
        run = _RunState(0, [], eval_before, ref)
        if eval_before is not None:
            hooks.on_eval("before", eval_before)
    (output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run.history))
    clock.lap("reference_s")

    model.train()
    while run.step < total_steps and not hooks.should_stop():
        step_started = time.perf_counter()
        lr = learning_rate_at(run.step, total_steps, params.learning_rate, warmup_steps, params.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = pairs_for_step(run.step, len(train), params.pairs_per_step, params.seed)
        step_pairs = [train[i] for i in indices]
        ref_chosen, ref_rejected = run.ref["train_chosen"][indices], run.ref["train_rejected"][indices]
        metrics = accumulate_step(model, step_pairs, ref_chosen, ref_rejected, params, pad_id, dev)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        seconds = time.perf_counter() - step_started
        metrics |= {
            "grad_norm": grad_norm.item(),
            "learning_rate": lr,
            # Tokens of the pairs' two sequences, as TRL counts them (the shared prompt runs once).
            "tokens_per_s": sum(p.num_tokens for p in step_pairs) / seconds,
            "pairs_per_s": len(step_pairs) / seconds,
            "epoch": run.step / steps_per_epoch(len(train), params.pairs_per_step),
        }
        run.history.append({"step": run.step, **metrics})
        with (output_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(run.history[-1]) + "\n")
        hooks.on_step(run.step, total_steps, metrics)
        if run.step % every == 0 and run.step < total_steps:
            hooks.on_checkpoint(run.step, _save_checkpoint(output_dir, model, optimizer, run, identity))
    clock.lap("train_s")
    last_metrics = run.history[-1] if run.history else None
    if run.step < total_steps:
        return TrainResult(
            "stopped", run.step, total_steps, None, run.eval_before, None, last_metrics, data, clock.laps
        )

    eval_ref = (run.ref["eval_chosen"], run.ref["eval_rejected"])
    eval_after = None
    if evals:
        eval_after = _eval_metrics(
            evals, score_pairs(model, evals, 2 * params.batch_size, pad_id, dev), eval_ref, params
        )
        hooks.on_eval("after", eval_after)
    clock.lap("eval_s")

    record = {"base_model": str(model_path), "data": data, "steps": run.step, "eval_before": run.eval_before}
    record |= {"resumed_from_step": resumed_from_step}
    record |= {"eval_after": eval_after, "last_metrics": last_metrics, "history": run.history}
    model_dir = _save_artifact(output_dir, model, tokenizer, params, record)
    shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    clock.lap("save_s")
    return TrainResult(
        "completed",
        run.step,
        total_steps,
        model_dir,
        run.eval_before,
        eval_after,
        last_metrics,
        data,
        clock.laps,
    )
