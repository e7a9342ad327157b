"""The DPO loop across the ranks of one worker: FSDP2 for full fine-tuning, DDP for LoRA.

`run_training(..., ranks=...)` comes here; it reads as the single-process loop in trainer.py, whose
pieces it reuses, with these differences:

- the model. Full fine-tuning: float32 weights loaded on the host, each decoder layer and then the
  rest sharded with `fully_shard` (on a GPU, bf16 compute with fp32 gradient reduction: the fp32
  shards are the master weights). LoRA: every rank holds the base (bf16 on a GPU) and float32
  adapters, under DistributedDataParallel. The log-prob code runs inside one module's forward
  (`PairForward`), so FSDP gathers and DDP reduces what it uses.
- the data. Every rank tokenizes every pair (the same order, the same steps). A step's pairs are
  shared out by tokens; each rank adds sum(losses) * world / n to the gradient, which DDP and FSDP
  average, so the step's gradient is the single-process one: the mean over its n pairs. Ranks
  with fewer forward passes in a step run zero-weighted ones, so collectives stay in step.
  Reference and evaluation log-probs are scored in shares and summed across ranks.
- decisions the leader takes (stop after this step? resume from which checkpoint?) are broadcast.
- metrics are summed across ranks; the leader alone writes metrics.jsonl, calls the hooks that
  write to the database, and saves the model (FSDP: gathered to the leader's host memory).
- checkpoints: torch.distributed.checkpoint, one shard file per rank (plus the leader's state.json
  and reference log-probs), resumed by a group of the same size. A checkpoint of another world size
  (or of a single process) is set aside and the run starts over: same data, same result.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cai_dpo.core.training_params import TrainParams
from workers.training.data import PairExample, TokenizedPair
from workers.training.distributed import Ranks, SetupFailed
from workers.training.dpo import METRIC_NAMES, _causal_lm, batch_metric_sums
from workers.training.trainer import (
    CHECKPOINT_DIR,
    MODEL_DIR,
    SPEED_SETTINGS,
    TrainHooks,
    TrainResult,
    _checkpoint_path,
    _Clock,
    _decoder_layers,
    _eval_metrics,
    _finished_result,
    _flex_supported,
    _forward_pairs,
    _low_precision,
    _make_optimizer,
    _micro_batches,
    _optimizer_step,
    _pair_losses,
    _PendingStep,
    _plan,
    _prepare_data,
    _reference_context,
    _replace_dir,
    _Runtime,
    _save_artifact,
    learning_rate_at,
    pairs_for_step,
    peak_flops,
    steps_per_epoch,
    total_steps_for,
)

log = logging.getLogger(__name__)


class PairForward(nn.Module):
    """The trainer's log-probs of a list of pairs as one module's forward: what DDP and FSDP wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, pairs: list[TokenizedPair], pad_token_id: int, device: torch.device, runtime: _Runtime
    ) -> tuple[Tensor, Tensor]:
        return _forward_pairs(self.model, pairs, pad_token_id, device, runtime)


@dataclass
class _Setup:
    model: nn.Module  # the Hugging Face (or peft) model
    engine: nn.Module  # PairForward under DDP or FSDP: every forward goes through it
    runtime: _Runtime
    fsdp: bool


def shard_pairs(tokens: list[int], world_size: int, *, by_tokens: bool) -> list[list[int]]:
    """Positions of a step's pairs for each rank: the longest first, each to the rank with the least
    work so far (pairs, or tokens when `by_tokens`); each rank's in step order."""
    shards: list[list[int]] = [[] for _ in range(world_size)]
    pairs, load = [0] * world_size, [0] * world_size
    for j in sorted(range(len(tokens)), key=lambda j: (-tokens[j], j)):
        rank = min(
            range(world_size),
            key=lambda r: (load[r], pairs[r], r) if by_tokens else (pairs[r], load[r], r),
        )
        shards[rank].append(j)
        pairs[rank] += 1
        load[rank] += tokens[j]
    return [sorted(shard) for shard in shards]


# --- the model ------------------------------------------------------------------------------------


def _load_local(model_path: Path, params: TrainParams, ranks: Ranks) -> tuple[nn.Module, _Runtime, bool]:
    """The model as every rank loads it, before any collective (a failure here is agreed on)."""
    from transformers import AutoModelForCausalLM

    device = ranks.device
    cuda, fsdp = device.type == "cuda", params.lora is None
    # FSDP keeps fp32 shards (the master weights) and computes in bf16; LoRA keeps a bf16 base.
    dtype = torch.bfloat16 if cuda and not fsdp else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    if not fsdp:
        model = model.to(device)  # FSDP moves each shard to the device itself: no full copy there
    model.config.use_cache = False
    for module in model.modules():  # as the single-process trainer (TRL's disable_dropout)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    plan = _plan(model)
    for note in plan.notes:
        log.info("%s: %s", plan.model_type, note)
    # FSDP's layers run once per forward: one padded batch rather than a row at a time.
    runtime = _Runtime(device, plan, unpad=not cuda and not fsdp, max_tokens=params.max_tokens_per_batch)
    if cuda and params.attention != "sdpa" and plan.windows is not None and _flex_supported(model):
        model.set_attn_implementation("flex_attention")
        runtime.flex = True
        model.train()
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
        # fp32 adapters (DDP reduces their gradients in fp32; AdamW steps them without masters).
        model = get_peft_model(model, config, autocast_adapter_dtype=True)
    if cuda and (runtime.flex or params.compile):
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    return model, runtime, fsdp


def _wrap(model: nn.Module, runtime: _Runtime, params: TrainParams, ranks: Ranks, fsdp: bool) -> nn.Module:
    """FSDP2 (full fine-tuning) or DDP (LoRA) around PairForward: collectives from here on."""
    device = ranks.device
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        # Inputs are lists of pairs, moved by the trainer itself: no device_ids. The buffers (rotary
        # frequencies) are the same on every rank: no sync before each forward.
        parameters = inspect.signature(DistributedDataParallel).parameters
        no_sync = {
            "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False
        }
        return DistributedDataParallel(PairForward(model), **no_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for layer in _decoder_layers(_causal_lm(model)):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        if device.type == "cuda" and params.compile:
            layer.compile()
    # The root holds the embeddings, final norm and LM head (tied or not: one group).
    engine = PairForward(model)
    fully_shard(engine, mesh=mesh, mp_policy=policy)
    return engine


def _state_options(*, loading: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the adapters; FSDP: every weight. Loading, the frozen base is not in the checkpoint
    # (non-strict); every trainable weight is, or dcp.load fails first.
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _clip_and_step(
    setup: _Setup, optimizer: Any, trainable: list[nn.Parameter], max_norm: float | None
) -> Tensor:
    if not setup.fsdp:  # DDP: every rank holds the same, reduced gradients
        return _optimizer_step(optimizer, trainable, max_norm)
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in trainable if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the norm over every shard
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(trainable, max_norm, norm)
    optimizer.step()
    return norm


# --- log-probs in shares ----------------------------------------------------------------------------


@torch.no_grad()
def score_pairs_sharded(
    engine: nn.Module,
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_token_id: int,
    runtime: _Runtime,
    ranks: Ranks,
) -> tuple[Tensor, Tensor]:
    """`trainer.score_pairs` across ranks: each rank scores every world_size-th forward pass of the
    length-sorted pairs (a repeat where it has none left, discarded), then the ranks sum."""
    n, device = len(pairs), ranks.device
    if n == 0:
        return torch.zeros(0), torch.zeros(0)
    was_training = engine.training
    if not runtime.flex:
        engine.eval()
    order = sorted(range(n), key=lambda i: pairs[i].packed_tokens)
    ordered = [pairs[i] for i in order]
    parts = _micro_batches(ordered, batch_size, runtime.score_tokens if runtime.flex else None)
    mine = parts[ranks.rank :: ranks.world_size]
    scored = torch.zeros(2, n, device=device)
    for round_ in range(math.ceil(len(parts) / ranks.world_size)):
        part = mine[round_] if round_ < len(mine) else parts[0]
        logps = engine(ordered[part], pad_token_id, device, runtime)[0].view(2, -1)
        if round_ < len(mine):
            scored[:, torch.tensor(order[part], device=device)] = logps
    engine.train(was_training)
    ranks.all_reduce_sum(scored)
    scored = scored.cpu()
    return scored[0], scored[1]


def _accumulate_share(
    setup: _Setup,
    pairs: list[TokenizedPair],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    params: TrainParams,
    pad_token_id: int,
    *,
    rounds: int,
    scale: float,
    spare: list[TokenizedPair],
) -> Tensor:
    """This rank's share of a step, forward and backward in `rounds` passes (zero-weighted passes
    on `spare` after its own run out); returns the metric sums of its pairs."""
    engine, runtime, device = setup.engine, setup.runtime, setup.runtime.device
    micro = _micro_batches(pairs, params.batch_size, runtime.max_tokens)
    sums = torch.zeros(len(METRIC_NAMES), device=device)
    for round_ in range(rounds):
        own = round_ < len(micro)
        # DDP reduces the gradients once, in the step's last backward.
        quiet = not setup.fsdp and round_ < rounds - 1
        with engine.no_sync() if quiet else contextlib.nullcontext():
            logps, lengths = engine(pairs[micro[round_]] if own else spare, pad_token_id, device, runtime)
            if not own:
                (logps.sum() * 0.0).backward()
                continue
            part = micro[round_]
            losses, chosen_rewards, rejected_rewards = _pair_losses(
                logps, ref_chosen[part], ref_rejected[part], lengths, params
            )
            (losses.sum() * scale).backward()
        sums += batch_metric_sums(losses, chosen_rewards, rejected_rewards, *logps.detach().chunk(2))
    return sums


def train_step(
    setup: _Setup,
    optimizer: Any,
    trainable: list[nn.Parameter],
    step_pairs: list[TokenizedPair],
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    params: TrainParams,
    pad_token_id: int,
    ranks: Ranks,
) -> tuple[Tensor, Tensor]:
    """One optimizer step on `step_pairs` (every rank passes all of them, with their reference
    log-probs): each rank's share forward and backward, the gradient reduced, clipped and applied.
    Returns the step's metrics (METRIC_NAMES, means over its pairs) and the gradient norm, on the
    device; the gradients are left for the caller to clear."""
    runtime = setup.runtime
    shares = shard_pairs(
        [p.packed_tokens for p in step_pairs], ranks.world_size, by_tokens=runtime.max_tokens is not None
    )
    rounds = max(
        len(_micro_batches([step_pairs[j] for j in share], params.batch_size, runtime.max_tokens))
        for share in shares
    )
    mine = torch.tensor(shares[ranks.rank], dtype=torch.long, device=ref_chosen.device)
    sums = _accumulate_share(
        setup,
        [step_pairs[j] for j in shares[ranks.rank]],
        ref_chosen[mine],
        ref_rejected[mine],
        params,
        pad_token_id,
        rounds=rounds,
        scale=ranks.world_size / len(step_pairs),
        spare=step_pairs[:1],
    )
    step_metrics = ranks.all_reduce_sum(sums) / len(step_pairs)
    return step_metrics, _clip_and_step(setup, optimizer, trainable, params.max_grad_norm)


# --- checkpoints --------------------------------------------------------------------------------------


@dataclass
class _RunState:
    step: int
    history: list[dict[str, float]]
    eval_before: dict[str, float] | None
    ref: dict[str, Tensor]


def _resume_plan(output_dir: Path, identity: dict[str, Any], world_size: int) -> dict[str, Any] | None:
    """The leader's look at the checkpoint: what to resume from, an error, or None (start over)."""
    path = _checkpoint_path(output_dir)
    if path is None:
        return None
    state = json.loads((path / "state.json").read_text())
    if state.get("world_size", 1) != world_size:
        log.warning(
            "%s was written by %d process(es), this run has %d: starting over",
            path,
            state.get("world_size", 1),
            world_size,
        )
        return None
    if any(state[key] != value for key, value in identity.items()):
        return {"error": f"{path} belongs to a run with other parameters or data; refusing to resume from it"}
    return {"path": str(path), "state": state}


def _save_checkpoint(
    output_dir: Path, setup: _Setup, optimizer: Any, run: _RunState, identity: dict[str, Any], ranks: Ranks
) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    staging, target = output_dir / f".{CHECKPOINT_DIR}-tmp", output_dir / CHECKPOINT_DIR
    if ranks.leader:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    ranks.barrier()
    model_state, optim_state = get_state_dict(setup.engine, optimizer, options=_state_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
    cuda_rng = torch.cuda.get_rng_state(ranks.device) if ranks.device.type == "cuda" else None
    torch.save({"torch": torch.get_rng_state(), "cuda": cuda_rng}, staging / f"rng-{ranks.rank}.pt")
    ranks.barrier()
    if ranks.leader:
        torch.save(run.ref, staging / "reference_logps.pt")
        state = {"step": run.step, "history": run.history, "eval_before": run.eval_before, **identity}
        state["world_size"] = ranks.world_size
        (staging / "state.json").write_text(json.dumps(state, indent=1))
        _replace_dir(staging, target)
    ranks.barrier()
    return target


def _load_checkpoint(
    path: Path, state: dict[str, Any], setup: _Setup, optimizer: Any, ranks: Ranks
) -> _RunState:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(setup.engine, optimizer, options=_state_options())
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(
        setup.engine,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=_state_options(loading=True),
    )
    rng = torch.load(path / f"rng-{ranks.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], ranks.device)
    ref = torch.load(path / "reference_logps.pt", weights_only=True)
    log.info("rank %d: resuming from %s at step %d", ranks.rank, path, state["step"])
    return _RunState(state["step"], state["history"], state["eval_before"], ref)


def _save_model(
    output_dir: Path,
    setup: _Setup,
    model_path: Path,
    tokenizer: Any,
    params: TrainParams,
    record: dict[str, Any],
    ranks: Ranks,
) -> Path | None:
    """The merged Hugging Face folder, written by the leader; FSDP's shards gathered to it first."""
    if setup.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(setup.engine, options=options)  # the leader's; {} elsewhere
        if not ranks.leader:
            return None
        weights = {name.removeprefix("model."): value for name, value in full.items()}
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.load_state_dict(weights, strict=False)
        missing = {name for name, _ in model.named_parameters()} - set(weights)
        if missing:
            raise RuntimeError(f"the gathered weights lack {sorted(missing)[:5]}")
        return _save_artifact(output_dir, model, tokenizer, params, record)
    if not ranks.leader:
        return None
    # fp32 before the merge: the adapters' update is not rounded into a bf16 base.
    return _save_artifact(output_dir, setup.model.float(), tokenizer, params, record)


# --- the loop --------------------------------------------------------------------------------------


def run_parallel(
    params: TrainParams,
    *,
    model_path: Path,
    train_pairs: list[PairExample],
    eval_pairs: list[PairExample],
    output_dir: Path,
    hooks: TrainHooks,
    checkpoint_steps: int,
    ranks: Ranks,
) -> TrainResult:
    from transformers import AutoTokenizer

    output_dir, leader, world = Path(output_dir), ranks.leader, ranks.world_size
    finished = (output_dir / MODEL_DIR / "training_config.json").exists()
    if ranks.broadcast(finished if leader else None):
        if leader:
            return _finished_result(output_dir / MODEL_DIR)
        return TrainResult("completed", 0, 0, None, None, None, None, {})
    dev = ranks.device
    every = params.checkpoint_steps or checkpoint_steps
    clock = _Clock()

    error: BaseException | None = None
    try:  # nothing collective: a failure here is the same on every rank, and agreed on
        output_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train, evals, data = _prepare_data(tokenizer, train_pairs, eval_pairs, params)
        total_steps = total_steps_for(params, len(train))
        warmup_steps = math.ceil(params.warmup_ratio * total_steps)
        identity = {
            "params": params.model_dump(exclude=SPEED_SETTINGS),
            "data_fingerprint": data["fingerprint"],
        }
        clock.lap("tokenize_s")
        torch.manual_seed(params.seed)
        model, runtime, fsdp = _load_local(model_path, params, ranks)
        flops_per_token = 6 * sum(p.numel() for p in model.parameters())
    except Exception as exc:  # noqa: BLE001 - agreed on by every rank
        error = exc
    ranks.check(error)

    setup = _Setup(model, _wrap(model, runtime, params, ranks, fsdp), runtime, fsdp)
    trainable = [p for p in setup.engine.parameters() if p.requires_grad]
    optimizer = _make_optimizer(trainable, params)
    data["world_size"], data["parallel"] = world, "fsdp" if fsdp else "ddp"
    clock.lap("load_s")

    plan = ranks.broadcast(_resume_plan(output_dir, identity, world) if leader else None)
    if plan is not None and "error" in plan:
        raise SetupFailed(plan["error"])
    if plan is not None:
        run = _load_checkpoint(Path(plan["path"]), plan["state"], setup, optimizer, ranks)
        resumed_from_step: int | None = run.step
    else:
        resumed_from_step = None
        with _reference_context(model):
            ref_train = score_pairs_sharded(
                setup.engine, train, 2 * params.batch_size, pad_id, runtime, ranks
            )
            ref_eval = score_pairs_sharded(setup.engine, evals, 2 * params.batch_size, pad_id, runtime, ranks)
        ref = {"train_chosen": ref_train[0], "train_rejected": ref_train[1]}
        ref |= {"eval_chosen": ref_eval[0], "eval_rejected": ref_eval[1]}
        eval_before = _eval_metrics(evals, ref_eval, ref_eval, params) if evals else None
        run = _RunState(0, [], eval_before, ref)
        if eval_before is not None:
            hooks.on_eval("before", eval_before)
    if leader:
        (output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run.history))
    clock.lap("reference_s")

    ref_chosen_all, ref_rejected_all = run.ref["train_chosen"].to(dev), run.ref["train_rejected"].to(dev)
    peak = peak_flops(dev)
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
            "tokens_per_s": done.tokens / seconds,  # of the whole group
            "pairs_per_s": done.pairs / seconds,
            "epoch": done.step / steps_per_epoch(len(train), params.pairs_per_step),
        }
        if peak:
            metrics["mfu"] = flops_per_token * done.tokens / seconds / (peak * world)
        run.history.append({"step": done.step, **metrics})
        if leader:
            with (output_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(run.history[-1]) + "\n")
        hooks.on_step(done.step, total_steps, metrics)

    setup.engine.train()
    while run.step < total_steps and not ranks.broadcast(hooks.should_stop() if leader else None):
        lr = learning_rate_at(run.step, total_steps, params.learning_rate, warmup_steps, params.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = pairs_for_step(run.step, len(train), params.pairs_per_step, params.seed)
        step_pairs = [train[i] for i in indices]
        index = torch.tensor(indices, dtype=torch.long, device=dev)
        step_metrics, grad_norm = train_step(
            setup, optimizer, trainable, step_pairs, ref_chosen_all[index], ref_rejected_all[index],
            params, pad_id, ranks,
        )  # fmt: skip
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
            path = _save_checkpoint(output_dir, setup, optimizer, run, identity, ranks)
            hooks.on_checkpoint(run.step, path)
    if pending is not None:
        report(pending)
    clock.lap("train_s")
    data["attention"] = "flex" if runtime.flex else ("sdpa" if dev.type == "cuda" else "cpu")
    last_metrics = run.history[-1] if run.history else None
    if run.step < total_steps:
        return TrainResult(
            "stopped", run.step, total_steps, None, run.eval_before, None, last_metrics, data, clock.laps
        )

    eval_after = None
    if evals:
        policy = score_pairs_sharded(setup.engine, evals, 2 * params.batch_size, pad_id, runtime, ranks)
        eval_after = _eval_metrics(evals, policy, (run.ref["eval_chosen"], run.ref["eval_rejected"]), params)
        hooks.on_eval("after", eval_after)
    clock.lap("eval_s")

    record = {"base_model": str(model_path), "data": data, "steps": run.step, "eval_before": run.eval_before}
    record |= {"resumed_from_step": resumed_from_step}
    record |= {"eval_after": eval_after, "last_metrics": last_metrics, "history": list(run.history)}
    model_dir = _save_model(output_dir, setup, model_path, tokenizer, params, record, ranks)
    ranks.barrier()
    if leader:
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
