"""The training loop: one function from pairs and a model folder to a merged Hugging Face model.
DPO, SFT and reward models (`objective`) run the same loop: SFT is its reference-free path with the
sft loss alone and no rejected answers; a reward model's forward gives each sequence's reward (the
model's runtime says so) and its loss is Bradley-Terry on them, with no reference either.
`run_stages` calls it once per stage (`stages`: SFT, then DPO from its model).

`run_training` reads top to bottom: tokenize, load, reference log-probs once, then per optimizer
step: the step's pairs, forward and backward (`step.forward_backward`), clip and step, log,
checkpoint; then evaluate and save. It knows nothing of the database; the worker passes hooks for
progress, checkpoints and cancellation.

One loop for one process and for a torchrun group, as nanoGPT's serves one GPU and DDP: it always
runs with a `Ranks` (`Ranks.single()` alone, whose collectives do nothing). Every rank calls it
with the same arguments; what differs between one process and several lives in `model.py` (the
layout: bf16 with fp32 masters, DDP, FSDP2 shards), `step.py` (each rank's share of a step) and
`checkpoint.py` (one file of each, or a shard per rank). The leader takes the decisions (stop after
this step? resume?) and tells the others, and alone writes metrics.jsonl, calls the hooks that
write to the database, and saves the model.

Resuming is one branch at the start: a checkpoint holds the trainable weights, optimizer state,
step, RNG state, metric history and the reference log-probs, and the data order and learning rate
are pure functions of (seed, step) (`schedule.py`), so a resumed run sees the same batches. On a GPU
metrics stay on the device and are read one step late, so the host never waits for the GPU inside
a step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cai_dpo.core.training_params import TrainParams, trl_config
from workers.training.checkpoint import MODEL_DIR, Checkpoints, RunState, save_model
from workers.training.data import PairExample, prepare_pairs
from workers.training.dpo import METRIC_NAMES, objective_metrics
from workers.training.model import (
    distribute,
    load_model,
    low_precision,
    peak_flops,
    reference_context,
    to_device,
)
from workers.training.optim import make_optimizer
from workers.training.ranks import Ranks, SetupFailed
from workers.training.reporting import Reporter
from workers.training.schedule import (
    learning_rate_at,
    pairs_for_step,
    steps_per_epoch,
    total_steps_for,
    warmup_steps_for,
)
from workers.training.step import eval_metrics, forward_backward, score_with, warm_compiled_shapes

log = logging.getLogger(__name__)

# Settings of speed and memory only (same updates): they may change between a stop and a resume.
SPEED_SETTINGS = {
    "checkpoint_steps",
    "max_tokens_per_batch",
    "gradient_checkpointing",
    "compile",
    "attention",
    "report_to",  # where the metrics are also sent, not what they are
}


def _never() -> bool:
    return False


def _graphs_compiled() -> int:
    """Graphs torch.compile (FlexAttention, compiled layers) has made in this process so far: the
    counter torch._dynamo keeps, 0 where it was never imported."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


@dataclass
class TrainHooks:
    """Callbacks into the caller; every one is optional. Under torchrun only the leader's are called
    with effect (the followers run with the defaults)."""

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
        self.compiled = 0  # graphs compiled while the step ran (a recompilation, past the warm-up)
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


class _StepLog:
    """Each step's metrics into the history, metrics.jsonl (the leader's) and the on_step hook.

    `lagged` (a GPU): a step is reported once the next one is queued, so the host never waits for
    the device mid-run. On a CPU there is nothing to overlap: each step reports at once.
    """

    def __init__(
        self,
        run: RunState,
        path: Path,
        hooks: TrainHooks,
        *,
        total_steps: int,
        per_epoch: int,
        flops_per_token: float,
        peak: float | None,
        ranks: Ranks,
        lagged: bool,
        objective: str,
    ) -> None:
        self.objective = objective
        self.run, self.path, self.hooks, self.ranks, self.lagged = run, path, hooks, ranks, lagged
        self.total_steps, self.per_epoch = total_steps, per_epoch
        self.flops_per_token, self.peak = flops_per_token, peak
        self.pending: _PendingStep | None = None
        self.last_report = time.perf_counter()
        self.graphs = _graphs_compiled()
        if ranks.leader:
            path.write_text("".join(json.dumps(row) + "\n" for row in run.history))

    def finished(self, done: _PendingStep) -> None:
        """A step is done: report the one before it (lagged) or this one."""
        graphs = _graphs_compiled()
        done.compiled, self.graphs = graphs - self.graphs, graphs
        if done.compiled:
            log.info("step %d compiled %d graph(s) (%d in this process)", done.step, done.compiled, graphs)
        self.flush()
        if self.lagged:
            self.pending = done
        else:
            self._report(done)

    def flush(self) -> None:
        if self.pending is not None:
            self._report(self.pending)
            self.pending = None

    def _report(self, done: _PendingStep) -> None:
        values = done.read()
        now = time.perf_counter()
        seconds, self.last_report = now - self.last_report, now
        metrics = objective_metrics(
            self.objective, dict(zip((*METRIC_NAMES, "grad_norm"), values, strict=True))
        )
        metrics |= {
            # TRL's: the tokens trained on so far (each once), this run's resumed history included.
            "num_tokens": (self.run.history[-1].get("num_tokens", 0) if self.run.history else 0)
            + done.tokens,
            "learning_rate": done.lr,
            # Of the whole group. Each token once: a pair's prompt is processed once for both answers.
            "tokens_per_s": done.tokens / seconds,
            "pairs_per_s": done.pairs / seconds,
            "epoch": done.step / self.per_epoch,
            "compiled_graphs": done.compiled,
        }
        if self.peak:
            metrics["mfu"] = (
                self.flops_per_token * done.tokens / seconds / (self.peak * self.ranks.world_size)
            )
        self.run.history.append({"step": done.step, **metrics})
        if self.ranks.leader:
            with self.path.open("a") as handle:
                handle.write(json.dumps(self.run.history[-1]) + "\n")
        self.hooks.on_step(done.step, self.total_steps, metrics)


def _finished_result(model_dir: Path) -> TrainResult:
    record = json.loads((model_dir / "training_config.json").read_text())
    steps = record["steps"]
    return TrainResult(
        "completed", steps, steps, model_dir, record["eval_before"], record["eval_after"],
        record["last_metrics"], record["data"],
    )  # fmt: skip


def run_training(
    params: TrainParams,
    *,
    model_path: Path,
    train_pairs: list[PairExample],
    eval_pairs: list[PairExample],
    output_dir: Path,
    hooks: TrainHooks | None = None,
    checkpoint_steps: int = 50,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train with DPO and write `output_dir/model`; resume from `output_dir/checkpoint` if there is one.

    `checkpoint_steps` is the worker's default, used when `params.checkpoint_steps` is None. A call
    on an `output_dir` that already holds the finished model returns its record without training.
    `ranks`: this process's place in a torchrun group, whose every rank calls this with the same
    arguments; None (or `Ranks.single()`) trains in this process alone.
    """
    from transformers import AutoTokenizer

    ranks = ranks or Ranks.single()
    hooks, output_dir, leader, dev = hooks or TrainHooks(), Path(output_dir), ranks.leader, ranks.device
    if ranks.broadcast((output_dir / MODEL_DIR / "training_config.json").exists() if leader else None):
        if leader:
            return _finished_result(output_dir / MODEL_DIR)
        return TrainResult("completed", 0, 0, None, None, None, None, {})
    every = params.checkpoint_steps or checkpoint_steps
    clock = _Clock()

    error: BaseException | None = None
    try:  # nothing collective: a failure here is the same on every rank, and agreed on
        output_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        lengths = params.max_length, params.max_prompt_length
        train, evals, data = prepare_pairs(
            tokenizer, train_pairs, eval_pairs, *lengths,
            chosen_only=params.objective == "sft",  # SFT has no use for the rejected answers
            whole=params.objective == "reward_model",  # a reward read from a cut answer: left out
            margins=params.use_margin,
        )  # fmt: skip
        total_steps = total_steps_for(params, len(train))
        warmup_steps = warmup_steps_for(params, total_steps)
        reporter = Reporter.open(  # TensorBoard, wandb: the leader's, beside metrics.jsonl
            params.report_to if leader else [], output_dir, config=params.model_dump(mode="json"),
            total_steps=total_steps,
        )  # fmt: skip
        hooks = reporter.wrap(hooks)
        identity = {
            "params": params.model_dump(exclude=SPEED_SETTINGS),
            "data_fingerprint": data["fingerprint"],
        }
        clock.lap("tokenize_s")
        torch.manual_seed(params.seed)
        model, runtime = load_model(model_path, params, ranks, pad_token_id=pad_id)
        flops_per_token = 6 * sum(p.numel() for p in model.parameters())  # forward + backward, 6N
    except Exception as exc:  # noqa: BLE001 - agreed on by every rank
        error = exc
    ranks.check(error)

    setup = distribute(model, runtime, params, ranks)
    optimizer = make_optimizer(setup.trainable, params.learning_rate, params.weight_decay)
    checkpoints = Checkpoints(output_dir, identity, ranks, on_written=hooks.on_checkpoint)
    data |= {"world_size": ranks.world_size, "parallel": setup.layout}
    clock.lap("load_s")

    run = checkpoints.load(setup, optimizer)
    resumed_from_step = run.step if run is not None else None
    if run is None:  # reference log-probs once, from the model before any update
        batch = 2 * params.batch_size
        with reference_context(setup.model):
            if params.reference_free:  # sft, simpo, orpo, a reward model: no reference read
                ref_train = torch.zeros(len(train)), torch.zeros(len(train))
            else:
                ref_train = score_with(setup, train, batch, pad_id, ranks)
            ref_eval = score_with(setup, evals, batch, pad_id, ranks)  # also the policy before
        ref = {"train_chosen": ref_train[0], "train_rejected": ref_train[1]}
        ref |= {"eval_chosen": ref_eval[0], "eval_rejected": ref_eval[1]}
        # Before any update the policy is the reference: its eval needs no second pass.
        eval_before = eval_metrics(evals, ref_eval, ref_eval, params) if evals else None
        run = RunState(0, [], eval_before, ref)
        if eval_before is not None:
            hooks.on_eval("before", eval_before)
    step_log = _StepLog(
        run, output_dir / "metrics.jsonl", hooks, total_steps=total_steps,
        per_epoch=steps_per_epoch(len(train), params.pairs_per_step), flops_per_token=flops_per_token,
        peak=peak_flops(dev), ranks=ranks, lagged=runtime.lagged, objective=params.objective,
    )  # fmt: skip
    clock.lap("reference_s")

    ref_chosen_all, ref_rejected_all = run.ref["train_chosen"].to(dev), run.ref["train_rejected"].to(dev)
    setup.engine.train()
    if setup.runtime.compiled and ranks.alone:
        shapes = warm_compiled_shapes(setup, train, params, pad_id, range(run.step, total_steps))
        optimizer.zero_grad()
        data["compiled_shapes"] = shapes
        clock.lap("compile_s")
    while run.step < total_steps and not ranks.broadcast(hooks.should_stop() if leader else None):
        lr = learning_rate_at(run.step, total_steps, params.learning_rate, warmup_steps, params.lr_schedule)
        optimizer.set_lr(lr)
        indices = pairs_for_step(run.step, len(train), params.pairs_per_step, params.seed)
        step_pairs = [train[i] for i in indices]
        index = to_device({"index": torch.tensor(indices)}, dev)["index"]
        step_refs = ref_chosen_all[index], ref_rejected_all[index]
        step_metrics = forward_backward(setup, step_pairs, *step_refs, params, pad_id, ranks)
        checkpoints.fence()  # the update waits for a checkpoint's copy of the weights it changes
        grad_norm = optimizer.clip_and_step(params.max_grad_norm)
        optimizer.zero_grad()
        run.step += 1
        step_log.finished(
            _PendingStep(
                run.step, lr, sum(runtime.counted_tokens(p) for p in step_pairs), len(step_pairs),
                torch.cat([step_metrics, grad_norm.detach().float().reshape(1)]),
            )
        )  # fmt: skip
        if run.step % every == 0 and run.step < total_steps:
            step_log.flush()
            checkpoints.save(setup, optimizer, run)  # written in the background (one process)
    step_log.flush()
    checkpoints.wait()  # the write in flight, at the end or at a stop
    if checkpoints.timings:
        data["checkpoints"] = checkpoints.timings
    clock.lap("train_s")
    data["attention"] = "flex" if runtime.flex else ("sdpa" if dev.type == "cuda" else "cpu")
    if runtime.flex_failed:
        data["flex_failed"] = runtime.flex_failed
    last_metrics = run.history[-1] if run.history else None
    if run.step < total_steps:
        reporter.close()
        return TrainResult(
            "stopped", run.step, total_steps, None, run.eval_before, None, last_metrics, data, clock.laps
        )

    eval_after = None
    if evals:
        policy = score_with(setup, evals, 2 * params.batch_size, pad_id, ranks)
        eval_after = eval_metrics(evals, policy, (run.ref["eval_chosen"], run.ref["eval_rejected"]), params)
        hooks.on_eval("after", eval_after)
    clock.lap("eval_s")
    reporter.close()  # its event files are whole before the model folder takes a copy

    # TRL's names beside ours, so trl.DPOConfig can repeat the run (trl_config says which keys it lacks)
    record = trl_config(params, total_steps, bf16=low_precision(dev))
    record |= {"base_model": str(model_path), "data": data, "steps": run.step, "eval_before": run.eval_before}
    record |= {"resumed_from_step": resumed_from_step}
    record |= {"eval_after": eval_after, "last_metrics": last_metrics, "history": list(run.history)}
    model_dir = save_model(
        output_dir, setup, optimizer, model_path=model_path, tokenizer=tokenizer, params=params,
        record=record, ranks=ranks,
    )  # fmt: skip
    checkpoints.discard()
    clock.lap("save_s")
    return TrainResult(
        "completed", run.step, total_steps, model_dir, run.eval_before, eval_after, last_metrics, data,
        clock.laps,
    )  # fmt: skip


class StageFailed(RuntimeError):
    """A stage of a staged run failed: the message names the stage."""


def run_stages(
    params: TrainParams, *, model_path: Path, output_dir: Path, hooks: TrainHooks | None = None, **run: Any
) -> TrainResult:
    """`run_training` once per stage (`params.stages`; one without), each from the model the one
    before saved: its reference model, for DPO. The last stage writes `output_dir/model`, the job's
    model; the ones before it write under `output_dir/stage-<i>-<objective>`.

    Resuming needs nothing more: a finished stage's folder returns its record at once, and the
    stage in progress resumes from its own checkpoint. Every stage trains as many steps (the same
    pairs and settings), so stage i's steps are reported as i × its total + its own step, each
    with `stage` (its index), and the evaluations before and after as one dict whose names each
    stage's objective prefixes (`sft/loss`, `dpo/rewards/accuracies`, ...), flat as a run's.
    """
    stages = params.stage_params()
    if len(stages) == 1:
        return run_training(params, model_path=model_path, output_dir=output_dir, hooks=hooks, **run)
    hooks = hooks or TrainHooks()
    evals: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    result: TrainResult
    for index, stage in enumerate(stages):
        last = index == len(stages) - 1

        def on_step(step: int, total: int, metrics: dict[str, float], index: int = index) -> None:
            hooks.on_step(index * total + step, len(stages) * total, {**metrics, "stage": index})

        def on_eval(when: str, metrics: dict[str, float], objective: str = stage.objective) -> None:
            evals[when] |= {f"{objective}/{name}": value for name, value in metrics.items()}
            hooks.on_eval(when, dict(evals[when]))

        stage_hooks = dataclasses.replace(hooks, on_step=on_step, on_eval=on_eval)
        stage_dir = output_dir if last else output_dir / f"stage-{index}-{stage.objective}"
        try:
            result = run_training(
                stage, model_path=model_path, output_dir=stage_dir, hooks=stage_hooks, **run
            )
        except Exception as exc:
            # A failed start stays one (every rank agreed on it: the torchrun group stays in step).
            failed = SetupFailed if isinstance(exc, SetupFailed) else StageFailed
            raise failed(f"stage {index} ({stage.objective}): {type(exc).__name__}: {exc}") from exc
        for when, metrics in (("before", result.eval_before), ("after", result.eval_after)):
            if metrics is not None and f"{stage.objective}/loss" not in evals[when]:  # a finished stage's
                on_eval(when, metrics)
        result.step += index * result.total_steps
        result.total_steps *= len(stages)
        if result.status != "completed":
            break
        model_path = result.model_dir
    result.eval_before = evals["before"] or None
    result.eval_after = evals["after"] or None
    return result
