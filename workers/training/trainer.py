"""The DPO training loop: one function from pairs and a model folder to a merged Hugging Face model.

`run_training` reads top to bottom: tokenize, load, reference log-probs once, then per optimizer
step: batch, forward, loss, backward, clip, step, log, checkpoint; then evaluate and save. It knows
nothing of the database; the worker passes hooks for progress, checkpoints and cancellation.

Resuming is one branch at the start: a checkpoint in `output_dir/checkpoint` holds the trainable
weights, optimizer state, step, RNG state, metric history and the reference log-probs. The data
order and learning rate are pure functions of (seed, step), so a resumed run sees the same batches.

Two devices, one loop. On a CPU the model is float32 and each pair runs as one unpadded row (its
prompt once). On a GPU the model is bfloat16 with float32 master weights in the optimizer (LoRA:
a frozen bfloat16 base, fp32 masters of the adapters only); the pairs of a forward pass are packed
into one row with no padding and FlexAttention block masks, cut by a token budget; metrics stay on
the device and are read one step late, so the host never waits for the GPU inside a step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cai_dpo.core.training_params import TrainParams
from workers.training.data import (
    PairExample,
    TokenizedPair,
    collate,
    collate_packed,
    collate_shared_prompt,
    fingerprint,
    token_batches,
    tokenize_pairs,
)
from workers.training.dpo import (
    METRIC_NAMES,
    LogpPlan,
    _causal_lm,
    batch_metric_tensor,
    batch_metrics,
    check_model,
    dpo_loss,
    packed_logps,
    pair_logps,
    sequence_logps,
)

if TYPE_CHECKING:
    from workers.training.distributed import Ranks

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
SPEED_SETTINGS = {
    "checkpoint_steps",
    "max_tokens_per_batch",
    "gradient_checkpointing",
    "compile",
    "attention",
}
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


class _PendingStep:
    """A finished optimizer step whose metrics are still on the device, copied back without a wait."""

    def __init__(self, step: int, lr: float, tokens: int, pairs: int, values: Tensor) -> None:
        self.step, self.lr, self.tokens, self.pairs = step, lr, tokens, pairs
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready: torch.cuda.Event | None = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = values, None

    def read(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


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

# Packed tokens per no-grad forward pass (reference and evaluation log-probs) on a GPU.
SCORE_TOKENS = 8192

# Dense bf16 peak FLOP/s by GPU name (vendor datasheets, without sparsity), for the logged MFU.
# CAI_DPO_PEAK_TFLOPS overrides it (and gives CPUs or other cards one).
_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when unknown (MFU is then not logged)."""
    override = os.environ.get("CAI_DPO_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


@dataclass
class _Runtime:
    """How this run computes log-probs on its device."""

    device: torch.device
    plan: LogpPlan
    flex: bool = False  # GPU: pairs packed in one row, FlexAttention
    unpad: bool = False  # CPU: each row runs alone at its own length
    max_tokens: int | None = None  # token budget per training forward pass
    score_tokens: int = SCORE_TOKENS  # token budget per no-grad forward pass (flex only)
    flex_proven: bool = False  # a FlexAttention forward and backward have run
    flex_failed: str | None = None


def _plan(model: nn.Module) -> LogpPlan:
    lm = _causal_lm(model)
    plan = getattr(lm, "_cai_dpo_plan", None)
    if plan is None:
        plan = check_model(lm)
        lm._cai_dpo_plan = plan
    return plan


def _default_runtime(model: nn.Module, device: torch.device) -> _Runtime:
    lm = _causal_lm(model)
    flex = device.type == "cuda" and lm.config._attn_implementation == "flex_attention"
    return _Runtime(device, _plan(model), flex=flex, unpad=device.type == "cpu")


def _flex_supported(lm: nn.Module) -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401 - torch >= 2.5
    except ImportError:
        return False
    return bool(getattr(type(lm), "_supports_flex_attn", False)) and hasattr(lm, "set_attn_implementation")


def _flex_fallback(model: nn.Module, runtime: _Runtime, exc: Exception) -> None:
    """FlexAttention failed on its first use (a compiler error, say): go on with SDPA's dense masks."""
    log.warning("FlexAttention failed (%s: %s); continuing with sdpa", type(exc).__name__, exc)
    _causal_lm(model).set_attn_implementation("sdpa")
    runtime.flex = False
    runtime.flex_failed = f"{type(exc).__name__}: {exc}"[:500]


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    layers = getattr(lm.base_model, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def _low_precision(device: torch.device) -> bool:
    """The GPU recipe: a bf16 model with fp32 master weights, metrics read one step late."""
    return device.type == "cuda"


def _load_model(model_path: Path, params: TrainParams, device: torch.device) -> tuple[nn.Module, _Runtime]:
    from transformers import AutoModelForCausalLM

    cuda, low = device.type == "cuda", _low_precision(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if low else torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.config.use_cache = False
    # As TRL (disable_dropout=True): DPO compares log-probs of the same model, dropout only adds noise.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    plan = _plan(model)  # refuses a model whose log-probs it cannot reproduce
    for note in plan.notes:
        log.info("%s: %s", plan.model_type, note)
    runtime = _Runtime(device, plan, unpad=not cuda, max_tokens=params.max_tokens_per_batch)
    if cuda and params.attention != "sdpa" and plan.windows is not None and _flex_supported(model):
        model.set_attn_implementation("flex_attention")
        runtime.flex = True
        # Train mode for the whole run, the reference pass included (dropout is off, so it computes
        # the same): transformers compiles FlexAttention anew at each switch between the modes,
        # which cost ~17 s of recompilation inside the first timed run on an H200.
        model.train()
    elif cuda and params.attention == "flex":
        log.warning("FlexAttention is not available for this model or torch; using sdpa")
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        # On a GPU the adapters stay bf16 like the base; their fp32 masters live in the optimizer.
        model = get_peft_model(model, config, autocast_adapter_dtype=not low)
    if cuda and (runtime.flex or params.compile):
        # Pair counts and lengths vary by batch: let dynamo mark them dynamic rather than give up.
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    if cuda and params.compile:
        for layer in _decoder_layers(_causal_lm(model)):
            layer.compile()
    return model, runtime


class MasterAdamW:
    """AdamW on float32 master copies of low-precision (bf16) parameters.

    The model computes in bf16 and its gradients arrive in bf16; clipping and the AdamW update run in
    fp32 on the masters, which are then rounded into the model's weights. Parameters step in groups of
    about `group_elements`, so fp32 copies of the gradients exist for one group at a time. Nothing here
    reads a value back to the host.
    """

    def __init__(
        self, params: list[nn.Parameter], lr: float, weight_decay: float, group_elements: int = 2**26
    ):
        self.params = list(params)
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, fused=True)
        self.groups: list[list[int]] = [[]]
        size = 0
        for index, param in enumerate(self.params):
            if self.groups[-1] and size + param.numel() > group_elements:
                self.groups.append([])
                size = 0
            self.groups[-1].append(index)
            size += param.numel()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def masters_by_param(self) -> dict[int, Tensor]:
        return {id(param): master for param, master in zip(self.params, self.masters, strict=True)}

    @torch.no_grad()
    def load_masters(self, values: dict[int, Tensor]) -> None:
        """Set masters (and the model's rounded weights) from fp32 values keyed by id(param)."""
        for param, master in zip(self.params, self.masters, strict=True):
            if id(param) in values:
                master.copy_(values[id(param)])
                param.copy_(master)

    @torch.no_grad()
    def clip_and_step(self, max_norm: float | None) -> Tensor:
        """Clip the global gradient norm to `max_norm` (None: no clipping), step; return the norm."""
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not with_grad:
            return torch.zeros((), device=self.masters[0].device)
        norms = torch._foreach_norm([self.params[i].grad for i in with_grad], 2.0, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        # Clipping multiplies the gradients by coef: fused AdamW divides them by its grad_scale (the
        # AMP unscaling) in the same pass as the update, so no separate pass over the gradients.
        self.optimizer.grad_scale = (total + 1e-6).div(max_norm).clamp(min=1.0) if max_norm else None
        for group in self.groups:
            members = [i for i in group if self.params[i].grad is not None]
            if not members:
                continue
            grads = [self.params[i].grad.float() for i in members]
            for i, grad in zip(members, grads, strict=True):
                self.masters[i].grad = grad
            self.optimizer.step()  # steps the masters that have a gradient: this group's
            for i in members:
                self.masters[i].grad = None
                self.params[i].copy_(self.masters[i])
        return total


def _make_optimizer(
    trainable: list[nn.Parameter], params: TrainParams
) -> torch.optim.Optimizer | MasterAdamW:
    if any(p.dtype != torch.float32 for p in trainable):
        return MasterAdamW(trainable, params.learning_rate, params.weight_decay)
    return torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay, fused=True)


def _optimizer_step(
    optimizer: torch.optim.Optimizer | MasterAdamW, trainable: list[nn.Parameter], max_norm: float | None
) -> Tensor:
    if isinstance(optimizer, MasterAdamW):
        return optimizer.clip_and_step(max_norm)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm or math.inf)
    optimizer.step()
    return grad_norm


def _reference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    # With LoRA the reference is the base model: the adapter switched off, no second copy held.
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Host tensors to the device; on a GPU through pinned memory, so the copy does not wait."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def _forward_pairs(
    model: nn.Module,
    pairs: list[TokenizedPair],
    pad_token_id: int,
    device: torch.device,
    runtime: _Runtime | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the pairs' answers (chosen then rejected, [2n], fp32) and their lengths in tokens."""
    runtime = runtime or _default_runtime(model, device)
    if runtime.plan.packs(max(p.longest_sequence for p in pairs)):
        if runtime.flex:
            flat = _to_device(collate_packed(pairs, pad_token_id), device)
            return packed_logps(model, flat, runtime.plan.windows).float(), flat["response_lengths"]
        packed = _to_device(collate_shared_prompt(pairs, pad_token_id), device)
        logps = pair_logps(model, packed, unpad=runtime.unpad, windows=runtime.plan.windows)
        return logps.float(), packed["response_lengths"]
    # Exact for any architecture: each sequence on its own, with the model's own masks.
    batch = _to_device(collate(pairs, pad_token_id), device)
    logps = sequence_logps(model, **batch, unpad=runtime.unpad)
    return logps.float(), batch["loss_mask"].sum(dim=1)


def _micro_batches(pairs: list[TokenizedPair], batch_size: int, max_tokens: int | None) -> list[slice]:
    """Consecutive runs of `pairs` per forward pass: by token budget when given, else batch_size pairs."""
    if max_tokens is None:
        return [slice(start, start + batch_size) for start in range(0, len(pairs), batch_size)]
    return [slice(batch[0], batch[-1] + 1) for batch in token_batches(pairs, max_tokens)]


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    *,
    runtime: _Runtime | None = None,
) -> tuple[Tensor, Tensor]:
    """Chosen and rejected log-probs of every pair without gradients (reference and evaluation).

    Returned on the CPU, read back once at the end. On a GPU with packing, forward passes hold
    `runtime.score_tokens` tokens each; elsewhere `batch_size` pairs.
    """
    runtime = runtime or _default_runtime(model, device)
    was_training = model.training
    # With FlexAttention the mode stays as it is (train, see _load_model): the trainer turns dropout
    # off, so both modes compute the same, and transformers recompiles FlexAttention at each switch.
    if not runtime.flex:
        model.eval()
    # Length-sorted batches waste less on padding; results go back to their pair's index.
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].packed_tokens)
    ordered = [pairs[i] for i in order]
    if runtime.flex and not runtime.flex_proven and ordered:
        try:
            _forward_pairs(model, ordered[:1], pad_token_id, device, runtime)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiled kernels
            _flex_fallback(model, runtime, exc)
            if not was_training:
                model.eval()
    budget = runtime.score_tokens if runtime.flex else None
    results = [
        _forward_pairs(model, ordered[part], pad_token_id, device, runtime)[0].view(2, -1)
        for part in _micro_batches(ordered, batch_size, budget)
    ]
    model.train(was_training)
    if not results:
        return torch.zeros(0), torch.zeros(0)
    scored = torch.cat(results, dim=1).cpu()
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    chosen[order], rejected[order] = scored[0], scored[1]
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


def _accumulate(
    model: nn.Module,
    pairs: list[TokenizedPair],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    params: TrainParams,
    pad_token_id: int,
    device: torch.device,
    runtime: _Runtime,
) -> Tensor:
    """`accumulate_step`, with the metrics left on the device as one tensor (METRIC_NAMES order)."""
    columns: list[tuple[Tensor, ...]] = []
    ref_chosen, ref_rejected = (
        ref_chosen.to(device, non_blocking=True),
        ref_rejected.to(device, non_blocking=True),
    )
    for micro in _micro_batches(pairs, params.batch_size, runtime.max_tokens):
        logps, lengths = _forward_pairs(model, pairs[micro], pad_token_id, device, runtime)
        losses, chosen_rewards, rejected_rewards = _pair_losses(
            logps, ref_chosen[micro], ref_rejected[micro], lengths, params
        )
        (losses.sum() / len(pairs)).backward()
        columns.append((losses.detach(), chosen_rewards, rejected_rewards, *logps.detach().chunk(2)))
    return batch_metric_tensor(*(torch.cat(column) for column in zip(*columns, strict=True)))


def accumulate_step(
    model: nn.Module,
    pairs: list[TokenizedPair],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    params: TrainParams,
    pad_token_id: int,
    device: torch.device,
    *,
    runtime: _Runtime | None = None,
) -> dict[str, float]:
    """Forward and backward over one optimizer step's pairs, in micro-batches of `params.batch_size`
    pairs (or of `params.max_tokens_per_batch` tokens).

    Each micro-batch adds sum(losses) / len(pairs) to the gradient, so the gradient is the mean over
    the whole step whatever the split (2 × 2 pairs == 1 × 4 pairs). Returns the step's metrics.
    """
    if runtime is None:
        runtime = _default_runtime(model, device)
        runtime.max_tokens = params.max_tokens_per_batch
    metrics = _accumulate(model, pairs, ref_chosen, ref_rejected, params, pad_token_id, device, runtime)
    return dict(zip(METRIC_NAMES, metrics.tolist(), strict=True))


def _eval_metrics(
    pairs: list[TokenizedPair], policy: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor], params: TrainParams
) -> dict[str, float]:
    logps = torch.cat(policy)
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    losses, chosen_rewards, rejected_rewards = _pair_losses(logps, *ref, lengths, params)
    return batch_metrics(losses, chosen_rewards, rejected_rewards, *policy)


# --- checkpoint and artifact --------------------------------------------------------------------


def _trainable_state(model: nn.Module, optimizer: Any = None) -> dict[str, Tensor]:
    """The trainable weights by name; fp32 masters where the optimizer keeps them."""
    masters = optimizer.masters_by_param() if isinstance(optimizer, MasterAdamW) else {}
    # named_parameters lists tied weights (embedding = LM head) once, which safetensors requires.
    return {
        name: masters.get(id(p), p).detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


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
    optimizer: torch.optim.Optimizer | MasterAdamW,
    run: _RunState,
    identity: dict[str, Any],
) -> Path:
    staging = output_dir / f".{CHECKPOINT_DIR}-tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file(_trainable_state(model, optimizer), staging / "trainable.safetensors")
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
    if state.get("world_size", 1) != 1:  # sharded by a torchrun group (parallel.py)
        log.warning("%s was written by %d processes; starting over in one", path, state["world_size"])
        return None
    if any(state[key] != value for key, value in identity.items()):
        raise ValueError(f"{path} belongs to a run with other parameters or data; refusing to resume from it")
    device = next(model.parameters()).device
    weights = load_file(path / "trainable.safetensors", device=str(device))
    mismatch = set(weights) ^ {name for name, p in model.named_parameters() if p.requires_grad}
    if mismatch:
        raise ValueError(f"{path}: trainable weights do not match the model: {sorted(mismatch)[:5]}")
    model.load_state_dict(weights, strict=False)
    if isinstance(optimizer, MasterAdamW):  # the fp32 masters, not their bf16 rounding
        named = dict(model.named_parameters())
        optimizer.load_masters({id(named[name]): value for name, value in weights.items()})
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    ref = torch.load(path / "reference_logps.pt", weights_only=True)
    log.info("resuming from %s at step %d", path, state["step"])
    return _RunState(state["step"], state["history"], state["eval_before"], ref)


def _save_artifact(
    output_dir: Path,
    model: nn.Module,
    tokenizer: Any,
    params: TrainParams,
    record: dict[str, Any],
    optimizer: Any = None,
) -> Path:
    """Write the merged model, tokenizer (with its chat template) and training record as one HF folder.

    With fp32 masters the model is first made fp32 and given the masters, so neither the saved
    weights nor a LoRA merge see the bf16 rounding.
    """
    if isinstance(optimizer, MasterAdamW):
        masters = optimizer.masters_by_param()
        optimizer.optimizer.state.clear()  # the moments are not needed any more: free them first
        model = model.float()  # keeps the Parameter objects (masters_by_param's keys)
        with torch.no_grad():
            for param in model.parameters():
                if id(param) in masters:
                    param.copy_(masters[id(param)])
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
        "train_tokens": sum(p.num_tokens for p in train),  # both sequences, as TRL counts them
        "train_packed_tokens": sum(p.packed_tokens for p in train),  # each token once
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
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train with DPO and write `output_dir/model`; resume from `output_dir/checkpoint` if there is one.

    `checkpoint_steps` is the worker's default, used when `params.checkpoint_steps` is None. A call
    on an `output_dir` that already holds the finished model returns its record without training.
    With `ranks` (a process group under torchrun) every rank calls it with the same arguments and
    the run is shared out among them (parallel.py).
    """
    from transformers import AutoTokenizer

    hooks, output_dir = hooks or TrainHooks(), Path(output_dir)
    if ranks is not None:
        from workers.training.parallel import run_parallel

        return run_parallel(
            params, model_path=model_path, train_pairs=train_pairs, eval_pairs=eval_pairs,
            output_dir=output_dir, hooks=hooks, checkpoint_steps=checkpoint_steps, ranks=ranks,
        )  # fmt: skip
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
        # Settings of speed and memory only (same updates) may change between a stop and a resume.
        "params": params.model_dump(exclude=SPEED_SETTINGS),
        "data_fingerprint": data["fingerprint"],
    }
    clock.lap("tokenize_s")

    torch.manual_seed(params.seed)
    model, runtime = _load_model(model_path, params, dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(trainable, params)
    clock.lap("load_s")

    run = _resume(output_dir, model, optimizer, identity)
    resumed_from_step = run.step if run is not None else None
    if run is None:  # reference log-probs once, from the model before any update
        with _reference_context(model):
            ref_train = score_pairs(model, train, 2 * params.batch_size, pad_id, dev, runtime=runtime)
            ref_eval = score_pairs(model, evals, 2 * params.batch_size, pad_id, dev, runtime=runtime)
        ref = {"train_chosen": ref_train[0], "train_rejected": ref_train[1]}
        ref |= {"eval_chosen": ref_eval[0], "eval_rejected": ref_eval[1]}
        # Before any update the policy is the reference: its eval needs no second pass.
        eval_before = _eval_metrics(evals, ref_eval, ref_eval, params) if evals else None
        run = _RunState(0, [], eval_before, ref)
        if eval_before is not None:
            hooks.on_eval("before", eval_before)
    (output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run.history))
    clock.lap("reference_s")

    ref_chosen_all = run.ref["train_chosen"].to(dev)
    ref_rejected_all = run.ref["train_rejected"].to(dev)
    flops_per_token = 6 * sum(p.numel() for p in model.parameters())  # forward + backward, 6N
    peak = peak_flops(dev)
    # On a GPU a step's metrics are read after the next step is queued: the host never waits for
    # the device mid-run. On a CPU there is nothing to overlap: each step reports at once.
    lagged = _low_precision(dev)
    pending: _PendingStep | None = None
    last_report = time.perf_counter()

    def report(done: _PendingStep) -> None:
        nonlocal last_report
        values = done.read()
        now = time.perf_counter()
        seconds, last_report = now - last_report, now
        metrics = dict(zip((*METRIC_NAMES, "grad_norm"), values, strict=True))
        metrics |= {
            "learning_rate": done.lr,
            # Each token once: a pair's prompt is processed once for both answers.
            "tokens_per_s": done.tokens / seconds,
            "pairs_per_s": done.pairs / seconds,
            "epoch": done.step / steps_per_epoch(len(train), params.pairs_per_step),
        }
        if peak:
            metrics["mfu"] = flops_per_token * done.tokens / seconds / peak
        run.history.append({"step": done.step, **metrics})
        with (output_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(run.history[-1]) + "\n")
        hooks.on_step(done.step, total_steps, metrics)

    model.train()
    while run.step < total_steps and not hooks.should_stop():
        lr = learning_rate_at(run.step, total_steps, params.learning_rate, warmup_steps, params.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = pairs_for_step(run.step, len(train), params.pairs_per_step, params.seed)
        step_pairs = [train[i] for i in indices]
        index = _to_device({"index": torch.tensor(indices)}, dev)["index"]
        step_refs = (ref_chosen_all[index], ref_rejected_all[index])
        try:
            step_metrics = _accumulate(model, step_pairs, *step_refs, params, pad_id, dev, runtime)
        except Exception as exc:
            if not runtime.flex or runtime.flex_proven:
                raise
            _flex_fallback(model, runtime, exc)
            optimizer.zero_grad(set_to_none=True)
            step_metrics = _accumulate(model, step_pairs, *step_refs, params, pad_id, dev, runtime)
        runtime.flex_proven = runtime.flex
        grad_norm = _optimizer_step(optimizer, trainable, params.max_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        done = _PendingStep(
            run.step, lr, sum(p.packed_tokens for p in step_pairs), len(step_pairs),
            torch.cat([step_metrics, grad_norm.detach().float().reshape(1)]),
        )  # fmt: skip
        if pending is not None:
            report(pending)
        pending = done if lagged else None
        if not lagged:
            report(done)
        if run.step % every == 0 and run.step < total_steps:
            if pending is not None:
                report(pending)
                pending = None
            hooks.on_checkpoint(run.step, _save_checkpoint(output_dir, model, optimizer, run, identity))
    if pending is not None:
        report(pending)
    clock.lap("train_s")
    data["attention"] = "flex" if runtime.flex else ("sdpa" if dev.type == "cuda" else "cpu")
    if runtime.flex_failed:
        data["flex_failed"] = runtime.flex_failed
    last_metrics = run.history[-1] if run.history else None
    if run.step < total_steps:
        return TrainResult(
            "stopped", run.step, total_steps, None, run.eval_before, None, last_metrics, data, clock.laps
        )

    eval_ref = (run.ref["eval_chosen"], run.ref["eval_rejected"])
    eval_after = None
    if evals:
        policy = score_pairs(model, evals, 2 * params.batch_size, pad_id, dev, runtime=runtime)
        eval_after = _eval_metrics(evals, policy, eval_ref, params)
        hooks.on_eval("after", eval_after)
    clock.lap("eval_s")

    record = {"base_model": str(model_path), "data": data, "steps": run.step, "eval_before": run.eval_before}
    record |= {"resumed_from_step": resumed_from_step}
    record |= {"eval_after": eval_after, "last_metrics": last_metrics, "history": run.history}
    model_dir = _save_artifact(output_dir, model, tokenizer, params, record, optimizer)
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
