"""The model a run trains, as one loader and one setup for a process alone or a torchrun group.

`load_model` reads the Hugging Face folder the same way on every rank, before any collective: its
dtype, dropout off, the log-prob plan `check_model` proves, FlexAttention where it applies,
gradient checkpointing, LoRA adapters. `distribute` then takes the steps that involve the other
ranks: every rank agrees whether FlexAttention works (each tries it on a small copy of the
architecture), the decoder layers are compiled when asked, and the model is wrapped as the layout
wants. The layouts (`layout_for`) are the only difference between one process and several:

- `single`: one process. CPU: float32, each row run alone at its own length. GPU: bfloat16 with
  float32 master weights in the optimizer (LoRA: a frozen bf16 base, masters of the adapters only).
- `ddp` (LoRA on several ranks): every rank holds the base (bf16 on a GPU) and float32 adapters,
  under DistributedDataParallel.
- `fsdp` (full fine-tuning on several ranks): float32 weights loaded on the host, each decoder
  layer and then the rest sharded with `fully_shard` (bf16 compute with fp32 gradient reduction on
  a GPU: the fp32 shards are the master weights).

Every forward goes through `PairForward`, one module whose forward is the trainer's log-probs of a
list of pairs (a reward model's: their rewards), so FSDP gathers and DDP reduces what it uses.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from cai_dpo.core.training_params import TrainParams
from workers.training.data import TokenizedPair, collate, collate_packed, collate_shared_prompt
from workers.training.dpo import (
    LogitTransform,
    LogpPlan,
    causal_lm,
    check_model,
    mask_windows,
    packed_logps,
    pair_logps,
    probe_copy,
    probe_pairs,
    sequence_logps,
)
from workers.training.ranks import Ranks
from workers.training.reward_model import is_reward_model, reward_head, sequence_rewards

log = logging.getLogger(__name__)

Layout = Literal["single", "ddp", "fsdp"]

# Packed tokens per no-grad forward pass (reference and evaluation log-probs) with FlexAttention.
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


def low_precision(device: torch.device) -> bool:
    """The GPU recipe: a bf16 model (with fp32 masters or fp32 shards), metrics read one step late."""
    return device.type == "cuda"


def layout_for(params: TrainParams, ranks: Ranks) -> Layout:
    if ranks.alone:
        return "single"
    return "fsdp" if params.lora is None else "ddp"


@dataclass
class Runtime:
    """How this run computes log-probs on its device."""

    device: torch.device
    plan: LogpPlan
    flex: bool = False  # GPU: pairs packed in one row, FlexAttention
    unpad: bool = False  # CPU: each row runs alone at its own length
    max_tokens: int | None = None  # token budget per training forward pass
    score_tokens: int = SCORE_TOKENS  # token budget per no-grad forward pass (flex only)
    lagged: bool = False  # metrics read one step late (the host never waits for the device)
    flex_failed: str | None = None
    ld_alpha: float | None = None  # LD-DPO's weighting of the log-probs (the run's params.ld_alpha)
    compiled: bool = False  # decoder layers torch.compile'd (CUDA; `compiles_layers`)
    reward: bool = False  # a reward model: the forward gives each sequence's reward, not log-probs

    def counted_tokens(self, pair: TokenizedPair) -> int:
        """A pair's tokens as a step's `num_tokens` counts them: its prompt once (both answers share
        it), or a reward model's two whole sequences, as TRL's RewardTrainer counts them."""
        return pair.num_tokens if self.reward else pair.packed_tokens


def _plan(model: nn.Module) -> LogpPlan:
    lm = causal_lm(model)
    plan = getattr(lm, "_cai_dpo_plan", None)
    if plan is None:
        plan = _reward_plan(lm) if is_reward_model(lm) else check_model(lm)
        lm._cai_dpo_plan = plan
    return plan


def _reward_plan(lm: nn.Module) -> LogpPlan:
    """A reward model reads one hidden state per sequence, through its own head: no LM head to prove,
    and each sequence runs with the model's own masks (no shared-prompt packing)."""
    reward_head(lm)  # refuses a model without one
    notes = ["a reward model: each sequence runs on its own, its reward the head at its last token"]
    return LogpPlan(lm.config.model_type, LogitTransform(), None, None, notes)


def default_runtime(model: nn.Module, device: torch.device) -> Runtime:
    """The runtime of a model handed in from outside a run (evaluation, tests): as loaded."""
    flex = device.type == "cuda" and causal_lm(model).config._attn_implementation == "flex_attention"
    reward = is_reward_model(model)
    return Runtime(device, _plan(model), flex=flex and not reward, unpad=device.type == "cpu", reward=reward)


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    layers = getattr(lm.base_model, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def _flex_supported(lm: nn.Module) -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401 - torch >= 2.5
    except ImportError:
        return False
    return bool(getattr(type(lm), "_supports_flex_attn", False)) and hasattr(lm, "set_attn_implementation")


def disable_dropout(model: nn.Module) -> None:
    """As TRL (disable_dropout=True, applied after the peft wrap): DPO compares log-probs of the same
    model, dropout only adds noise, and the held-out metrics must not depend on the mode."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0


def load_pretrained(model_path: Path, params: TrainParams, dtype: torch.dtype) -> nn.Module:
    """The Hugging Face model a run trains: the causal LM, or for objective reward_model the same body
    under a fresh one-logit classification head (TRL's RewardTrainer: num_labels=1), its init drawn
    from the run's seed."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if params.objective == "reward_model":
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, dtype=dtype, attn_implementation="sdpa"
        )
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")


def load_model(
    model_path: Path, params: TrainParams, ranks: Ranks, *, pad_token_id: int | None = None
) -> tuple[nn.Module, Runtime]:
    """The model as every rank loads it, before any collective (a failure here is agreed on).
    `pad_token_id`: the tokenizer's, written into a reward model's config, where its head (and the
    scorer after it) looks for the last token of a padded row."""
    device, layout = ranks.device, layout_for(params, ranks)
    cuda, low = device.type == "cuda", low_precision(device)
    # FSDP keeps fp32 shards (the master weights) and computes in bf16; the others hold bf16.
    dtype = torch.bfloat16 if low and layout != "fsdp" else torch.float32
    model = load_pretrained(model_path, params, dtype)
    reward = params.objective == "reward_model"
    if reward and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if layout != "fsdp":
        model = model.to(device)  # FSDP moves each shard to the device itself: no full copy there
    model.config.use_cache = False
    plan = _plan(model)  # refuses a model whose log-probs it cannot reproduce
    for note in plan.notes:
        log.info("%s: %s", plan.model_type, note)
    # FSDP's layers run once per forward: one padded batch rather than a row at a time.
    runtime = Runtime(
        device, plan, unpad=not cuda and layout != "fsdp", max_tokens=params.max_tokens_per_batch, lagged=low,
        ld_alpha=params.ld_alpha, reward=reward,
    )  # fmt: skip
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
            # SEQ_CLS: peft trains the fresh head whole beside the adapters (modules_to_save)
            task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        )
        # One process on a GPU: the adapters stay bf16 like the base, their fp32 masters in the
        # optimizer. DDP: fp32 adapters (it reduces their gradients in fp32; AdamW steps them as
        # they are).
        model = get_peft_model(model, config, autocast_adapter_dtype=not low or layout == "ddp")
    # After the adapters exist, so theirs too (the FlexAttention path scores in train mode).
    disable_dropout(model)
    if runtime.flex or compiles_layers(params, device):
        # Pair counts and lengths vary by batch: let dynamo mark them dynamic rather than give up.
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    return model, runtime


# --- FlexAttention, decided once for every rank --------------------------------------------------


def flex_failure(lm: nn.Module, device: torch.device) -> str | None:
    """What fails when FlexAttention runs forward and backward on a small copy of the architecture
    on this device, in the run's compute dtype; None when it works.

    The known failures are compiled kernels that do not fit the card (pytorch/pytorch#133254,
    #198224: the backward's shared memory, by head size and dtype), which the copy meets as the
    model would. Trying the copy needs no collective, so no rank can be left inside one.
    """
    try:
        probe = probe_copy(lm).to(device, torch.bfloat16 if low_precision(device) else torch.float32)
        probe.set_attn_implementation("flex_attention")
        probe.train()
        vocab = probe.get_output_embeddings().weight.shape[0]
        flat = to_device(collate_packed(probe_pairs(vocab, torch.Generator().manual_seed(0)), 0), device)
        packed_logps(probe, flat, mask_windows(probe.config)).sum().backward()
    except Exception as exc:  # noqa: BLE001 - any failure of the compiled kernels
        return f"{type(exc).__name__}: {exc}"[:500]
    return None


def settle_attention(model: nn.Module, runtime: Runtime, ranks: Ranks) -> None:
    """Keep FlexAttention only if it works on every rank; else every rank goes on with SDPA."""
    failure = flex_failure(causal_lm(model), runtime.device) if runtime.flex else None
    failures = [text for text in ranks.all_gather(failure) if text is not None]
    if failures:
        log.warning("FlexAttention failed (%s); continuing with sdpa", failures[0])
        causal_lm(model).set_attn_implementation("sdpa")
        runtime.flex = False
        runtime.flex_failed = failures[0]


# --- the setup: compiled, wrapped -----------------------------------------------------------------


class PairForward(nn.Module):
    """The trainer's log-probs of a list of pairs as one module's forward: what DDP and FSDP wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, pairs: list[TokenizedPair], pad_token_id: int, runtime: Runtime
    ) -> tuple[Tensor, Tensor]:
        return forward_pairs(self.model, pairs, pad_token_id, runtime)


@dataclass
class Setup:
    """The run's model: the Hugging Face (or peft) model, and the module every forward goes through."""

    model: nn.Module
    engine: nn.Module  # PairForward; under DDP or FSDP on several ranks
    runtime: Runtime
    layout: Layout

    @classmethod
    def alone(
        cls,
        model: nn.Module,
        device: torch.device,
        max_tokens: int | None = None,
        ld_alpha: float | None = None,
    ) -> Setup:
        """A model handed in from outside a run (evaluation, tests), in this process."""
        runtime = default_runtime(model, device)
        runtime.max_tokens, runtime.ld_alpha = max_tokens, ld_alpha
        return cls(model, PairForward(model), runtime, "single")

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.engine.parameters() if p.requires_grad]

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a backward: DDP reduces the gradients once, in a step's last backward."""
        return self.engine.no_sync() if self.layout == "ddp" and not last else contextlib.nullcontext()


def compiles_layers(params: TrainParams, device: torch.device) -> bool:
    """Decoder layers compiled: on a GPU unless the run says no (a step there is dispatch-bound,
    ~1,850 small kernels launched from Python); never on the CPU, where inductor's compile costs
    more than a short run saves."""
    return device.type == "cuda" and params.compile is not False


def distribute(model: nn.Module, runtime: Runtime, params: TrainParams, ranks: Ranks) -> Setup:
    """The loaded model ready to train: attention agreed, layers compiled, wrapped for the layout.
    Collectives from here on."""
    settle_attention(model, runtime, ranks)
    device, layout = ranks.device, layout_for(params, ranks)
    layers = decoder_layers(causal_lm(model))
    if layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (ranks.world_size,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if low_precision(device)
            else MixedPrecisionPolicy()
        )
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    if compiles_layers(params, device):
        for layer in layers:
            layer.compile()
        runtime.compiled = True
    engine: nn.Module = PairForward(model)
    if layout == "fsdp":
        # The root holds the embeddings, final norm and LM head (tied or not: one group).
        fully_shard(engine, mesh=mesh, mp_policy=policy)
    elif layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Inputs are lists of pairs, moved by the trainer itself: no device_ids. The buffers (rotary
        # frequencies) are the same on every rank: no sync before each forward.
        parameters = inspect.signature(DistributedDataParallel).parameters
        no_sync = {
            "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False
        }
        engine = DistributedDataParallel(engine, **no_sync)
    return Setup(model, engine, runtime, layout)


def reference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    # With LoRA the reference is the base model: the adapter switched off, no second copy held.
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


# --- one forward pass -----------------------------------------------------------------------------


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Host tensors to the device; on a GPU through pinned memory, so the copy does not wait."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def forward_pairs(
    model: nn.Module, pairs: list[TokenizedPair], pad_token_id: int, runtime: Runtime
) -> tuple[Tensor, Tensor]:
    """Log-probs of the pairs' answers (chosen then rejected, [2n], fp32) and their lengths in tokens;
    a reward model's rewards of the two sequences in their place."""
    kind, host = collate_for(pairs, pad_token_id, runtime)
    batch = to_device(host, runtime.device)
    if runtime.reward:  # `collate`'s rows: each sequence on its own
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"], unpad=runtime.unpad)
        return rewards, batch["loss_mask"].sum(dim=1)
    ld_alpha = runtime.ld_alpha
    if kind == "flex":
        logps = packed_logps(model, batch, runtime.plan.windows, ld_alpha=ld_alpha)
        return logps.float(), batch["response_lengths"]
    if kind == "shared_prompt":
        logps = pair_logps(model, batch, unpad=runtime.unpad, windows=runtime.plan.windows, ld_alpha=ld_alpha)
        return logps.float(), batch["response_lengths"]
    logps = sequence_logps(model, **batch, unpad=runtime.unpad, ld_alpha=ld_alpha)
    return logps.float(), batch["loss_mask"].sum(dim=1)


def collate_for(
    pairs: list[TokenizedPair], pad_token_id: int, runtime: Runtime
) -> tuple[Literal["flex", "shared_prompt", "exact"], dict[str, Tensor]]:
    """The host batch a forward of these pairs runs on, and which path reads it: one packed row
    (FlexAttention), a shared prompt per pair, or (exact for any architecture) each sequence on its
    own with the model's own masks. Its shapes are the shapes compiled kernels meet."""
    if runtime.plan.packs(max(p.longest_sequence for p in pairs)):
        if runtime.flex:
            return "flex", collate_packed(pairs, pad_token_id)
        return "shared_prompt", collate_shared_prompt(pairs, pad_token_id)
    return "exact", collate(pairs, pad_token_id)
