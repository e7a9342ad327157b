"""A run's checkpoint and its result, the Hugging Face model folder.

`Checkpoints` is the one interface the loop sees: `save` every N steps, `load` once at the start,
`discard` once the model is saved. A checkpoint holds the trainable weights, the optimizer state,
the RNG state, the step, the metric history and the reference log-probs. Its weights and optimizer
come in one of two formats, by who wrote it:

- one process: `trainable.safetensors` (the fp32 masters where the optimizer keeps them),
  `optimizer.pt`, `rng.pt`;
- a torchrun group: torch.distributed.checkpoint, one shard file per rank, and `rng-<rank>.pt`.

The leader decides whether to resume and tells the others; only a group of the size that wrote a
checkpoint resumes from it (another size starts over: same data, same result). The leader writes
`state.json` and the reference log-probs, and the model folder (FSDP: gathered to its host memory).
Folders are written beside their place and moved in, so a crash leaves the old one or the new one.

One process writes in the background, so a checkpoint does not stall training: `save` copies the
state to host memory (pinned, on a side CUDA stream, into buffers kept from one save to the next),
and a thread writes the copy. One write is in flight at a time: the next `save` waits for the one
before (rather than skipping it, so checkpoints keep their interval and one set of host buffers
serves), and `wait` (the run's end, a stop) waits for it and reports it (`on_written`, on the
training thread). A write that fails is raised by the next `save` or `wait`; the folder it was
writing is the staging one, so the previous checkpoint stays the one to resume from. `fence` is
called before each optimizer step: that step waits for the copy of the weights it updates in place.
A torchrun group writes synchronously (torch.distributed.checkpoint's save is collective).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cai_dpo.core.training_params import TrainParams
from workers.training.model import Setup, load_pretrained
from workers.training.optim import Optimizer
from workers.training.ranks import Ranks

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"


@dataclass
class RunState:
    """What a checkpoint restores besides weights, optimizer and RNG."""

    step: int
    history: list[dict[str, float]]
    eval_before: dict[str, float] | None
    ref: dict[str, Tensor]  # reference log-probs: train_chosen, train_rejected, eval_chosen, eval_rejected


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written folder into place; a crash leaves either the old or the new one."""
    previous = target.with_name(f".{target.name}-old")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    if previous.exists():
        shutil.rmtree(previous)


def checkpoint_path(output_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}-old"):  # -old: a crash between replace_dir's renames
        if (output_dir / name / "state.json").exists():
            return output_dir / name
    return None


class Checkpoints:
    """The checkpoint of the run in `output_dir`, for a run of `identity` (its parameters and data).

    `on_written(step, path)` is called on the training thread once a checkpoint is in place: by
    `save` (synchronous, or the write before) or `wait`. `background`: write in a thread (default:
    one process alone; a torchrun group writes synchronously)."""

    def __init__(
        self,
        output_dir: Path,
        identity: dict[str, Any],
        ranks: Ranks,
        *,
        on_written: Callable[[int, Path], None] = lambda step, path: None,
        background: bool | None = None,
    ):
        self.output_dir, self.identity, self.ranks = output_dir, identity, ranks
        self.on_written = on_written
        self.background = ranks.alone if background is None else background
        self._buffers: dict[tuple[Any, ...], Tensor] = {}  # host copies, reused from one save to the next
        self._copied: torch.cuda.Event | None = None  # the side stream's copy, for `fence`
        self._held: Any = None  # what the side stream copies from, kept alive until the write is done
        self._writer: threading.Thread | None = None
        self._outcome: tuple[int, Path] | BaseException | None = None
        # Per checkpoint: the training thread's share (the snapshot, or the whole synchronous save)
        # and the time until the checkpoint was in place; what a checkpoint costs, read by the
        # benchmark and logged.
        self.timings: list[dict[str, float]] = []

    def save(self, setup: Setup, optimizer: Optimizer, run: RunState) -> None:
        """Checkpoint the run at `run.step`: written before this returns (a torchrun group), or copied
        to host memory and written in the background (one process)."""
        started = time.perf_counter()
        if not self.background:
            path = self._save_now(setup, optimizer, run)
            seconds = time.perf_counter() - started
            self._timed(run.step, training_thread_s=seconds, written_s=seconds)
            self.on_written(run.step, path)
            return
        self.wait()  # one write in flight; its host buffers are the ones this copy fills
        started = time.perf_counter()
        snapshot, ready = self._snapshot(setup.model, optimizer, run)
        snapshot_s = time.perf_counter() - started
        self._writer = threading.Thread(
            target=self._write,
            args=(snapshot, ready, started, snapshot_s),
            name="checkpoint-writer",
            daemon=False,
        )
        self._writer.start()

    def _timed(self, step: int, **seconds: float) -> None:
        self.timings.append({"step": step, **seconds})
        log.info("checkpoint at step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in seconds.items()))

    def fence(self) -> None:
        """Before an optimizer step: the step waits (on the device) for the copy of what it updates."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None

    def wait(self) -> None:
        """Wait for the write in flight, report it, or raise what it failed with."""
        if self._writer is None:
            return
        self._writer.join()
        self._writer, outcome, self._outcome, self._held = None, self._outcome, None, None
        if isinstance(outcome, BaseException):
            raise RuntimeError("writing the checkpoint failed; the previous one stays") from outcome
        if outcome is not None:
            self.on_written(*outcome)

    def _snapshot(
        self, model: nn.Module, optimizer: Optimizer, run: RunState
    ) -> tuple[dict[str, Any], torch.cuda.Event | None]:
        """The checkpoint's content in host memory, taken on the training thread."""
        live = {
            "trainable": _trainable_live(model, optimizer),
            "optimizer": optimizer.state_dict(),
            "ref": run.ref,
        }
        ready = None
        if any(t.is_cuda for t in _tensors(live)):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                host = self._to_host(live, (), pin=True)
            ready = torch.cuda.Event()
            ready.record(stream)
            # Tensors made for the state_dict (a step count's copy) must not return to the caching
            # allocator, to be reused on the training stream, before the side stream has read them.
            self._copied, self._held = ready, live
        else:
            host = self._to_host(live, (), pin=False)
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        host["rng"] = {"torch": torch.get_rng_state(), "cuda": cuda_rng}
        state = {"step": run.step, "history": copy.deepcopy(run.history), "eval_before": run.eval_before}
        host["state"] = state | self.identity | {"world_size": self.ranks.world_size}
        return host, ready

    def _to_host(self, value: Any, path: tuple[Any, ...], *, pin: bool) -> Any:
        """`value` with each tensor copied into a host buffer of its own (kept for the next save)."""
        if isinstance(value, Tensor):
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=pin and value.is_cuda)
                self._buffers[path] = buffer
            buffer.copy_(value.detach(), non_blocking=value.is_cuda)
            return buffer
        if isinstance(value, dict):
            return {key: self._to_host(item, (*path, key), pin=pin) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._to_host(item, (*path, i), pin=pin) for i, item in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return copy.deepcopy(value)

    def _write(
        self, snapshot: dict[str, Any], ready: torch.cuda.Event | None, started: float, snapshot_s: float
    ) -> None:
        """The writer thread: the snapshot into the staging folder, then the folder into place."""
        try:
            if ready is not None:
                ready.synchronize()
            staging, target = self.output_dir / f".{CHECKPOINT_DIR}-tmp", self.output_dir / CHECKPOINT_DIR
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            trainable = {name: t.contiguous() for name, t in snapshot["trainable"].items()}
            save_file(trainable, staging / "trainable.safetensors")
            torch_save(snapshot["optimizer"], staging / "optimizer.pt")
            torch_save(snapshot["rng"], staging / "rng.pt")
            torch_save(snapshot["ref"], staging / "reference_logps.pt")
            (staging / "state.json").write_text(json.dumps(snapshot["state"], indent=1))
            replace_dir(staging, target)
            self._outcome = (snapshot["state"]["step"], target)
            written_s = time.perf_counter() - started
            self._timed(snapshot["state"]["step"], training_thread_s=snapshot_s, written_s=written_s)
        except BaseException as exc:  # noqa: BLE001 - raised on the training thread by `wait`
            log.exception("writing the checkpoint at step %d failed", snapshot["state"]["step"])
            self._outcome = exc

    def _save_now(self, setup: Setup, optimizer: Optimizer, run: RunState) -> Path:
        ranks = self.ranks
        staging, target = self.output_dir / f".{CHECKPOINT_DIR}-tmp", self.output_dir / CHECKPOINT_DIR
        if ranks.leader:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        ranks.barrier()
        if ranks.alone:
            _save_files(staging, setup.model, optimizer)
        else:
            _save_shards(staging, setup, optimizer, ranks)
        ranks.barrier()
        if ranks.leader:
            torch_save(run.ref, staging / "reference_logps.pt")
            state = {"step": run.step, "history": run.history, "eval_before": run.eval_before}
            state |= self.identity | {"world_size": ranks.world_size}
            (staging / "state.json").write_text(json.dumps(state, indent=1))
            replace_dir(staging, target)
        ranks.barrier()
        return target

    def load(self, setup: Setup, optimizer: Optimizer) -> RunState | None:
        """Restore the last checkpoint into model and optimizer; None when there is none to resume."""
        ranks = self.ranks
        decision = ranks.broadcast(self._decide() if ranks.leader else None)
        ranks.check(ValueError(decision["error"]) if decision and "error" in decision else None)
        if decision is None:
            return None
        path, state = Path(decision["path"]), decision["state"]
        if ranks.alone:
            _load_files(path, setup.model, optimizer, ranks.device)
        else:
            _load_shards(path, setup, optimizer, ranks)
        ref = torch.load(path / "reference_logps.pt", weights_only=True)
        log.info("rank %d: resuming from %s at step %d", ranks.rank, path, state["step"])
        return RunState(state["step"], state["history"], state["eval_before"], ref)

    def discard(self) -> None:
        """Remove the checkpoint, once the model it led to is saved."""
        self.wait()
        self.ranks.barrier()
        if self.ranks.leader:
            shutil.rmtree(self.output_dir / CHECKPOINT_DIR, ignore_errors=True)

    def _decide(self) -> dict[str, Any] | None:
        """The leader's look at the checkpoint: what to resume from, an error, or None (start over)."""
        path = checkpoint_path(self.output_dir)
        if path is None:
            return None
        state = json.loads((path / "state.json").read_text())
        written_by = state.get("world_size", 1)
        if written_by != self.ranks.world_size:
            log.warning(
                "%s was written by %d process(es), this run has %d: starting over",
                path,
                written_by,
                self.ranks.world_size,
            )
            return None
        if any(state[key] != value for key, value in self.identity.items()):
            return {
                "error": f"{path} belongs to a run with other parameters or data; refusing to resume from it"
            }
        return {"path": str(path), "state": state}


# --- one process: a file of each --------------------------------------------------------------------


def torch_save(value: Any, path: Path) -> None:
    """torch.save, the one place a checkpoint's .pt files are written (a test makes it fail)."""
    torch.save(value, path)


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _trainable_live(model: nn.Module, optimizer: Optimizer) -> dict[str, Tensor]:
    """The trainable weights by name, where they live; fp32 masters where the optimizer keeps them."""
    masters = optimizer.masters()
    # named_parameters lists tied weights (embedding = LM head) once, which safetensors requires.
    return {name: masters.get(id(p), p).detach() for name, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: nn.Module, optimizer: Optimizer) -> dict[str, Tensor]:
    """The trainable weights by name in host memory; fp32 masters where the optimizer keeps them."""
    return {name: t.cpu().contiguous() for name, t in _trainable_live(model, optimizer).items()}


def _save_files(staging: Path, model: nn.Module, optimizer: Optimizer) -> None:
    save_file(trainable_state(model, optimizer), staging / "trainable.safetensors")
    torch_save(optimizer.state_dict(), staging / "optimizer.pt")
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch_save({"torch": torch.get_rng_state(), "cuda": cuda_rng}, staging / "rng.pt")


def _load_files(path: Path, model: nn.Module, optimizer: Optimizer, device: torch.device) -> None:
    weights = load_file(path / "trainable.safetensors", device=str(device))
    named = dict(model.named_parameters())
    mismatch = set(weights) ^ {name for name, p in named.items() if p.requires_grad}
    if mismatch:
        raise ValueError(f"{path}: trainable weights do not match the model: {sorted(mismatch)[:5]}")
    model.load_state_dict(weights, strict=False)
    optimizer.load_masters({id(named[name]): value for name, value in weights.items()})
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


# --- a torchrun group: a shard per rank ---------------------------------------------------------------


def _state_options(*, loading: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the adapters; FSDP: every weight. Loading, the frozen base is not in the checkpoint
    # (non-strict); every trainable weight is, or dcp.load fails first.
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _save_shards(staging: Path, setup: Setup, optimizer: Optimizer, ranks: Ranks) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # Every layout under torchrun trains fp32 weights: the torch optimizer's state is all of it.
    model_state, optim_state = get_state_dict(setup.engine, optimizer.optimizer, options=_state_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
    cuda_rng = torch.cuda.get_rng_state(ranks.device) if ranks.device.type == "cuda" else None
    torch.save({"torch": torch.get_rng_state(), "cuda": cuda_rng}, staging / f"rng-{ranks.rank}.pt")


def _load_shards(path: Path, setup: Setup, optimizer: Optimizer, ranks: Ranks) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(setup.engine, optimizer.optimizer, options=_state_options())
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(
        setup.engine,
        optimizer.optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=_state_options(loading=True),
    )
    rng = torch.load(path / f"rng-{ranks.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], ranks.device)


# --- the model folder -----------------------------------------------------------------------------------


def save_model(
    output_dir: Path,
    setup: Setup,
    optimizer: Optimizer,
    *,
    model_path: Path,
    tokenizer: Any,
    params: TrainParams,
    record: dict[str, Any],
    ranks: Ranks,
) -> Path | None:
    """The merged Hugging Face folder, written by the leader (None elsewhere); FSDP's shards are
    gathered to it first."""
    model = setup.model
    if setup.layout == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(setup.engine, options=options)  # the leader's; {} elsewhere
        if not ranks.leader:
            return None
        weights = {name.removeprefix("model."): value for name, value in full.items()}
        model = load_pretrained(model_path, params, torch.float32)
        model.config.pad_token_id = setup.model.config.pad_token_id
        model.load_state_dict(weights, strict=False)
        missing = {name for name, _ in model.named_parameters()} - set(weights)
        if missing:
            raise RuntimeError(f"the gathered weights lack {sorted(missing)[:5]}")
    elif not ranks.leader:
        return None
    return write_model_folder(output_dir, model, optimizer, tokenizer=tokenizer, params=params, record=record)


def write_model_folder(
    output_dir: Path,
    model: nn.Module,
    optimizer: Optimizer,
    *,
    tokenizer: Any,
    params: TrainParams,
    record: dict[str, Any],
) -> Path:
    """Write the merged model, tokenizer (with its chat template) and training record as one HF folder.

    The model is first made fp32 and given the optimizer's masters, if it keeps any, so neither the
    saved weights nor a LoRA merge see bf16 rounding.
    """
    masters = optimizer.masters()
    optimizer.free()  # the moments are not needed any more: free them first
    model = model.float()  # keeps the Parameter objects (the masters' keys)
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
    if (output_dir / "runs").is_dir():  # TensorBoard's event files (report_to) travel with the model
        shutil.copytree(output_dir / "runs", staging / "runs")
    target = output_dir / MODEL_DIR
    replace_dir(staging, target)
    return target
