"""Training parameters: the body of `POST /train`, validated here without importing torch.

Defaults follow TRL 1.16's `DPOConfig` where the two overlap (beta, loss names, label smoothing,
`keep_start` truncation), so a run here and a run with TRL mean the same thing. The body also takes
TRL's names for the settings named otherwise here (`TRL_ALIASES`, and `trl.ModelConfig`'s
`use_peft`/`lora_*` for `lora`), and `trl_config` writes a run's settings back under TRL's names.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from cai_dpo.core.evaluation import EvaluationRequest
from cai_dpo.core.model_refs import ModelRef
from cai_dpo.core.strict_json import StrictJson

# TRL 1.16's DPOTrainer loss names, then the reference-free SimPO (TRL's CPOTrainer, loss_type="simpo")
# and ORPO (TRL's ORPOTrainer); workers/training/dpo.py holds the math.
LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "simpo",
    "orpo",
]
REFERENCE_FREE = ("simpo", "orpo")
# Losses that read label_smoothing (sigmoid: cDPO; robust: rDPO's flip rate; exo_pair: its epsilon).
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")
# Losses that read a plain sum of the chosen tokens' log-probs (the NLL), or no reference: TRL's
# ld_alpha weights only the DPO losses' log-probs (DPOConfig; CPO and ORPO have none).
NOT_LENGTH_DESENSITISED = ("sft", "simpo", "orpo")
# TRL's report_to integrations the worker writes to (workers/training/reporting.py).
ReportTo = Literal["tensorboard", "wandb"]
# What a run trains: "dpo" on pairs (loss_type's family), "sft" on the chosen answers alone (SL-CAI),
# "reward_model" a scalar head on the pairs (Bradley-Terry, TRL's RewardTrainer): a scorer, not a policy.
Objective = Literal["dpo", "sft", "reward_model"]
# The objectives a staged run chains (each stage's model the next one's start and reference).
StageObjective = Literal["dpo", "sft"]
# DPO's settings, and their defaults: with objective "sft" or "reward_model" each must keep its
# default (a 422 names it).
DPO_ONLY = {
    "loss_type": "sigmoid",
    "loss_weights": None,
    "rpo_alpha": None,
    "cpo_alpha": 0.0,
    "simpo_gamma": 0.5,
    "discopop_tau": 0.05,
    "beta": 0.1,
    "ld_alpha": None,
    "label_smoothing": 0.0,
}
# The reward model's settings (TRL's RewardConfig and its dataset's margin), and their defaults:
# with another objective each must keep its default.
REWARD_MODEL_ONLY = {"center_rewards_coefficient": None, "use_margin": False}

# TRL's names (DPOConfig, i.e. transformers' TrainingArguments) of the settings named otherwise here.
TRL_ALIASES = {
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_schedule",
    "save_steps": "checkpoint_steps",
    "torch_compile": "compile",
}
# trl.ModelConfig's LoRA names (TRL's scripts read them beside DPOConfig) -> LoraParams' fields.
TRL_LORA = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
}
TRL_PEFT = ("use_peft", *TRL_LORA)


class LoraParams(StrictJson):
    """LoRA adapter settings; the adapter is merged into the base weights in the final artifact."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="peft's lora_dropout, accepted for compatibility: DPO runs with every dropout off, "
        "the adapters' included (as TRL's disable_dropout), so it has no effect.",
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Names of the linear layers to adapt (e.g. q_proj, v_proj). "
        "None adapts every linear layer of the transformer blocks (peft's 'all-linear'), not the LM head.",
    )


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: 4 is 4.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _names_loss(name: str) -> dict[str, Any]:
    """JSON Schema: a loss_type value that is, or lists, `name`."""
    return {"anyOf": [{"const": name}, {"type": "array", "contains": {"const": name}}]}


def _alias_schema(field: dict[str, Any], trl_name: str, description: str) -> dict[str, Any]:
    """A TRL name's property in the document: the field's own type and bounds, no default of its own
    (the default is the field's, stated once)."""
    alias = copy.deepcopy(field)
    alias.pop("default", None)
    alias["title"] = trl_name.replace("_", " ").title()
    alias["description"] = description
    return alias


def _train_params_schema(schema: dict[str, Any]) -> None:
    """What JSON Schema can state of TrainParams' validators, and TRL's names as properties.

    Stated: DPO's settings (DPO_ONLY) at their defaults and no stages with objective sft or
    reward_model; cpo_alpha only beside simpo; ld_alpha not beside sft, simpo, orpo or rpo_alpha;
    `lora_*` only with `use_peft: true` and not beside `lora`. Four rules at most: Schemathesis'
    canonicaliser runs out of its intersection allowance on this many properties with a fifth
    (each rule doubles the branches every property meets). Not stated (in the descriptions, and
    tests/schemathesis_hooks.py's UNSTATED): `use_peft` alone beside `lora`, the reward model's
    settings (REWARD_MODEL_ONLY) with another objective, weights as many as losses,
    reference-free losses combined with sft alone, exo_pair's label smoothing, a TRL name and ours
    given with different values.
    """
    properties = schema["properties"]
    for trl_name, ours in TRL_ALIASES.items():
        description = f"TRL's name for `{ours}` (the same value, or leave one out)."
        properties[trl_name] = _alias_schema(properties[ours], trl_name, description)
    properties["use_peft"] = {
        "type": "boolean",
        "title": "Use Peft",
        "description": "trl.ModelConfig's switch for LoRA: true trains a `lora` adapter set by the lora_* "
        "names (LoraParams' defaults for those left out); false trains every weight. Not beside `lora`.",
    }
    lora = LoraParams.model_json_schema()["properties"]
    for trl_name, ours in TRL_LORA.items():
        description = f"trl.ModelConfig's name for `lora.{ours}`; needs use_peft: true."
        properties[trl_name] = _alias_schema(lora[ours], trl_name, description)
    ld_beside = [_names_loss(name) for name in NOT_LENGTH_DESENSITISED]
    schema["allOf"] = [
        {
            "if": {"not": {"required": ["loss_type"], "properties": {"loss_type": _names_loss("simpo")}}},
            "then": {"properties": {"cpo_alpha": {"maximum": 0}}},
        },
        {
            "if": {"required": ["ld_alpha"], "properties": {"ld_alpha": {"type": "number"}}},
            "then": {
                "properties": {
                    "loss_type": {"not": {"anyOf": ld_beside}},
                    "rpo_alpha": {"anyOf": [{"type": "null"}, {"maximum": 0}]},
                }
            },
        },
        {  # one rule for both: Schemathesis gives up on a body with one if/then more
            "if": {"required": ["objective"], "properties": {"objective": {"enum": ["sft", "reward_model"]}}},
            "then": {
                "properties": {
                    "stages": {"type": "null"},
                    **{name: {"const": value} for name, value in DPO_ONLY.items()},
                }
            },
        },
        {
            "if": {"anyOf": [{"required": [name]} for name in TRL_LORA]},
            "then": {
                "required": ["use_peft"],
                "properties": {"use_peft": {"const": True}},
                "not": {"required": ["lora"]},
            },
        },
    ]


class TrainParams(StrictJson):
    """Hyperparameters of one DPO run."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=_train_params_schema)

    objective: Objective = Field(
        "dpo",
        description="dpo: preference optimisation on the pairs (loss_type; a reference model unless the "
        "loss is reference-free). sft (SL-CAI): supervised fine-tuning on each pair's prompt + chosen "
        "answer, the loss the mean NLL of the chosen answers' tokens (prompt tokens masked; TRL's "
        "SFTTrainer with completion-only loss), no reference model. reward_model: a reward model, "
        "the base model with a one-logit sequence-classification head (AutoModelForSequenceClassification) "
        "trained with the Bradley-Terry loss on the pairs (TRL's RewardTrainer; center_rewards_coefficient, "
        "use_margin), no reference model; the held-out pairs' reward accuracy is its evaluation, and "
        'its model scores answers: a best_of_n job\'s `"scorer": {"kind": "reward_model", "model": '
        '"train:<id>"}`. With sft and reward_model, DPO\'s settings (loss_type, loss_weights, rpo_alpha, '
        "cpo_alpha, simpo_gamma, discopop_tau, beta, ld_alpha, label_smoothing) must keep their defaults.",
    )
    stages: Annotated[list[StageObjective], Field(min_length=1)] | None = Field(
        None,
        json_schema_extra={"uniqueItems": True},
        description="Objectives run one after the other in one job, each starting from the model the "
        'one before saved (e.g. ["sft", "dpo"]: the H4 recipe, DPO\'s reference model being the SFT '
        "model); the job's model is the last stage's. Every stage takes this body's other settings "
        "(the sft stage leaving DPO's aside). Not beside objective.",
    )
    loss_type: LossType | Annotated[list[LossType], Field(min_length=1)] = Field(
        "sigmoid",
        description="A loss name or a list of them (summed, weighted by loss_weights), TRL 1.16's names. "
        "With a reference model: sigmoid (DPO), hinge (SLiC), ipo (per-token-averaged log-ratios), "
        "exo_pair, nca_pair, robust (rDPO), bco_pair, sppo_hard, aot, aot_unpaired (sorted over the "
        "forward pass's pairs), apo_zero, apo_down, discopop, sigmoid_norm; sft: the NLL of the chosen "
        "answers per token. Reference-free (no reference pass): simpo (length-averaged log-probs, "
        "margin simpo_gamma; combine with sft or cpo_alpha for CPO's NLL) and orpo (NLL plus β·odds "
        "ratio); these two take only sft beside them.",
    )
    loss_weights: list[float] | None = Field(
        None,
        min_length=1,
        description="One weight per loss_type entry (TRL's loss_weights); None: 1 each.",
    )
    rpo_alpha: float | None = Field(
        None,
        ge=0,
        description="RPO: adds rpo_alpha × the NLL of the chosen answers (the sft term) to the loss.",
    )
    cpo_alpha: float = Field(
        0.0,
        ge=0,
        description="CPO's NLL weight beside simpo (TRL's CPOConfig.cpo_alpha; its default 1.0 is "
        "CPO-SimPO, 0 here is plain SimPO).",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin gamma (TRL's default).")
    discopop_tau: float = Field(
        0.05, gt=0, description="DiscoPOP's temperature of the logistic/exponential mix (TRL's default)."
    )
    beta: float = Field(0.1, gt=0, description="KL strength; for IPO it is the regulariser tau.")
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="reward_model: adds this × the mean of (r_chosen + r_rejected)² to the loss, so the "
        "rewards centre on zero (TRL's RewardConfig.center_rewards_coefficient; 0.01 in its docs). "
        "None: off. Only with objective reward_model.",
    )
    use_margin: bool = Field(
        False,
        description="reward_model: the Bradley-Terry loss asks for each pair's recorded margin as the "
        "least gap, -log σ(r_chosen - r_rejected - margin), as TRL's RewardTrainer does when its dataset "
        "has a margin column. A pair's margin is its scorer's (best_of_n's reward gap, a judge's log-odds) "
        "or an import's; pairs without one take 0. Only with objective reward_model.",
    )
    ld_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="LD-DPO (TRL's ld_alpha): an answer's log-prob sums its tokens up to the length of "
        "the pair's shorter answer, plus ld_alpha × the rest of the longer one, for policy and reference "
        "alike, so the longer answer's extra tokens count less. 1: plain DPO; 0: only the shared length "
        "counts; None: off. Not with sft, simpo, orpo or rpo_alpha (their NLL reads plain sums).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped. robust: TRL's rDPO. "
        "sigmoid: conservative DPO (cDPO), -(1-e)·logσ(βΔ) - e·logσ(-βΔ). Must be 0 for losses that do "
        "not smooth (ipo, hinge, ...), and above 0 with exo_pair.",
    )
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate of AdamW.")
    lr_schedule: Literal["linear", "cosine"] = Field(
        "linear", description="Decay from the peak to zero after the warmup."
    )
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="Fraction of the optimizer steps spent warming up."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm; None: no clipping."
    )
    epochs: int = Field(
        1, ge=1, le=10_000, description="Passes over the training pairs (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Optimizer steps to run; when set it wins over epochs."
    )
    batch_size: int = Field(4, ge=1, description="Pairs per forward pass (each pair is two sequences).")
    gradient_accumulation: int = Field(
        1, ge=1, description="Forward passes per optimizer step; the step sees batch_size × this many pairs."
    )
    max_length: int = Field(
        1024,
        ge=2,
        description="Most tokens of prompt + response; longer sequences keep their start (as TRL). "
        "reward_model: a pair with a longer sequence is left out, as TRL's RewardTrainer does (a reward "
        "read from a cut answer would score the part it saw).",
    )
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        description="If set, prompts longer than this keep only their last tokens before max_length applies. "
        "None (TRL 1.16's behaviour): prompts are not cut; pairs whose prompt fills max_length are dropped.",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds the data order and adapter initialisation.")
    eval_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of the prompts held out (every pair of a held-out prompt) to measure reward "
        "accuracy before and after; the same prompts as the export's `test` split at this fraction.",
    )
    lora: LoraParams | None = Field(None, description="LoRA settings; None trains every weight.")
    checkpoint_steps: int | None = Field(
        None, ge=1, description="Checkpoint every this many optimizer steps; None: the worker's default."
    )
    save_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the saved model. The weights are trained in float32 (on a GPU: float32 "
        "master weights behind a bfloat16 model); bfloat16 halves the files but rounds away updates "
        "below ~0.4% of a weight.",
    )
    max_tokens_per_batch: int | None = Field(
        None,
        ge=16,
        le=2**24,
        description="Most tokens per forward pass (each pair's prompt once plus both answers): an "
        "optimizer step's pairs are cut into forward passes under this budget, whatever batch_size. "
        "None: batch_size pairs per forward pass. The step, its gradient and the data order are the same "
        "either way; only memory and speed change.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass: less memory, "
        "about a third more compute.",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the decoder layers. None: on a GPU yes, on the CPU no (the CPU never "
        "compiles). Before the first step a single-process run compiles for every input shape its "
        "steps will meet (timings.compile_s), so no step pays a compilation.",
    )
    attention: Literal["auto", "flex", "sdpa"] = Field(
        "auto",
        description="GPU attention. auto and flex: the pairs of a forward pass packed in one row "
        "without padding, FlexAttention block masks (torch >= 2.5 and a model that supports it; else sdpa). "
        "sdpa: one padded row per pair with a dense mask. The CPU always uses sdpa.",
    )
    evaluate: bool = Field(
        True,
        description="Evaluate the trained model when the job succeeds: win rate against the base model "
        "on the held-out prompts (judged), reward accuracy on `evaluation.external`. A reward model "
        "(objective reward_model) is not judged: its evaluation is eval_before and eval_after, the "
        "held-out pairs' reward accuracy.",
    )
    evaluation: EvaluationRequest | None = Field(
        None, description="How to evaluate (see POST /train/{id}/evaluate); None: the defaults."
    )
    report_to: list[ReportTo] | Literal["none", "tensorboard", "wandb"] = Field(
        default_factory=list,
        description="Where each step's metrics (metrics.jsonl's, under TRL's names) and the evaluations "
        "before and after are also sent, TRL's report_to: tensorboard: event files in the run's folder "
        "and the model folder's runs/ (the worker needs the tensorboard package); wandb: a Weights & "
        "Biases run set by the worker's WANDB_* environment (the worker needs wandb). A name alone, or "
        "none, as TRL takes them. Default []: nowhere else, as transformers 5's none. A worker without "
        "the package fails the run, naming report_to.",
    )

    @model_validator(mode="before")
    @classmethod
    def _trl_names(cls, data: Any) -> Any:
        """TRL's names to ours: a setting given under both names must have one value."""
        if not isinstance(data, dict) or not (set(data) & (set(TRL_ALIASES) | set(TRL_PEFT))):
            return data
        data = dict(data)
        for trl_name, ours in TRL_ALIASES.items():
            if trl_name not in data:
                continue
            value = data.pop(trl_name)
            if ours in data and not _same_json(data[ours], value):
                raise ValueError(f"{trl_name} is TRL's name for {ours}: given both, with different values")
            data[ours] = value
        peft = {name: data.pop(name) for name in TRL_PEFT if name in data}
        if peft:
            if "lora" in data:
                raise ValueError("lora: give lora or TRL's use_peft and lora_* names, not both")
            use_peft = peft.pop("use_peft", None)
            if peft and use_peft is not True:
                raise ValueError(f"{', '.join(peft)}: TRL's LoRA names need use_peft: true")
            if use_peft is True:
                data["lora"] = {TRL_LORA[name]: value for name, value in peft.items()}
            elif use_peft is not False:
                raise ValueError("use_peft: a boolean")
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainParams:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if self.stages is not None:
            if len(set(self.stages)) < len(self.stages):
                raise ValueError(f"stages: each objective at most once, not {self.stages}")
            if self.objective != "dpo":
                raise ValueError("objective: give stages or objective, not both")
        if self.objective != "dpo":
            for name in DPO_ONLY:
                if not _same_json(getattr(self, name), DPO_ONLY[name]):
                    raise ValueError(f"{name} is a DPO setting: not with objective {self.objective}")
        if self.objective == "reward_model" and self.evaluation is not None:
            raise ValueError(
                "evaluation: a reward model generates no answers to judge; its evaluation is the held-out "
                "pairs' reward accuracy (eval_after)"
            )
        if self.objective != "reward_model":
            for name in REWARD_MODEL_ONLY:
                if not _same_json(getattr(self, name), REWARD_MODEL_ONLY[name]):
                    raise ValueError(f"{name} is a reward_model setting: not with objective {self.objective}")
        names = self.loss_types
        if not names:
            raise ValueError("loss_type: an empty list names no loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} weights for {len(names)} loss_type entries"
            )
        free = [name for name in names if name in REFERENCE_FREE]
        if free and (len(set(free)) > 1 or set(names) - {free[0], "sft"}):
            raise ValueError(
                f"loss_type {free[0]!r} is reference-free: it combines only with 'sft', not with {names}"
            )
        if self.label_smoothing > 0 and not set(names) & set(SMOOTHED):
            raise ValueError(f"label_smoothing has no meaning for loss_type={self.loss_type!r}")
        if "exo_pair" in names and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (EXO recommends 1e-3)")
        if self.cpo_alpha > 0 and "simpo" not in names:
            raise ValueError("cpo_alpha is the NLL weight beside loss_type simpo; use rpo_alpha otherwise")
        if self.ld_alpha is not None:
            plain = [name for name in names if name in NOT_LENGTH_DESENSITISED] + ["rpo_alpha"] * bool(
                self.rpo_alpha
            )
            if plain:
                raise ValueError(f"ld_alpha weights the DPO losses' log-probs; not beside {plain}")
        return self

    @field_validator("report_to", mode="after")
    @classmethod
    def _report_to_list(cls, value: list[str] | str) -> list[str]:
        """TRL's single-name spellings as the list they mean."""
        if isinstance(value, str):
            return [] if value == "none" else [value]
        return value

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def loss_terms(self) -> tuple[list[str], list[float]]:
        """The losses and their weights, rpo_alpha and cpo_alpha added as sft terms; objective sft:
        the sft term alone."""
        if self.objective == "sft":
            return ["sft"], [1.0]
        names = self.loss_types
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(names)
        for extra in (self.rpo_alpha, self.cpo_alpha):
            if extra:
                names, weights = [*names, "sft"], [*weights, extra]
        return names, weights

    @property
    def reference_free(self) -> bool:
        """simpo, orpo and objectives sft and reward_model read no reference log-probs: no
        reference pass is run."""
        return self.objective != "dpo" or any(name in REFERENCE_FREE for name in self.loss_types)

    def stage_params(self) -> list[TrainParams]:
        """Each stage's settings, in order (one: this run's own). A stage before the last saves in
        float32, so the next starts from its weights unrounded; an sft stage leaves DPO's settings."""
        if self.stages is None:
            return [self]
        stages = []
        for index, objective in enumerate(self.stages):
            update: dict[str, Any] = {"objective": objective, "stages": None}
            if objective == "sft":
                update |= DPO_ONLY
            if index < len(self.stages) - 1:
                update["save_dtype"] = "float32"
            stages.append(self.model_copy(update=update))
        return stages

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation


# The keys of `trl_config` that trl.DPOConfig does not take: trl.ModelConfig's (TRL's scripts read
# both from one file).
TRL_MODEL_CONFIG_KEYS = TRL_PEFT
# The keys of a run's training_config.json beside TRL's: the service's own record of the run.
RUN_RECORD_KEYS = (
    "params", "base_model", "data", "steps", "eval_before", "eval_after", "last_metrics", "resumed_from_step"
)  # fmt: skip


def trl_config(params: TrainParams, total_steps: int, *, bf16: bool) -> dict[str, Any]:
    """The run's settings under TRL 1.16's names: `trl.DPOConfig(**config)` (objective sft:
    `trl.SFTConfig`; reward_model: `trl.RewardConfig`) builds once the keys in
    TRL_MODEL_CONFIG_KEYS (trl.ModelConfig's LoRA settings) are taken out. A run's
    training_config.json holds these and RUN_RECORD_KEYS.

    rpo_alpha (and cpo_alpha) is TRL 1.x's spelling of RPO: an "sft" loss_type entry with that weight. With
    transformers 5 a warmup ratio is `warmup_steps` below 1 (a whole run of warmup: the step count).
    `bf16`: whether the run computed in bfloat16 (on a GPU; fp32 master weights, as TRL's bf16).
    Settings TRL has no name for (max_prompt_length, cpo_alpha, simpo_gamma, eval_fraction,
    save_dtype, ...) are not here; simpo and orpo are CPOTrainer's and ORPOTrainer's losses, not
    DPOTrainer's.
    """
    names, weights = params.loss_terms()
    warmup = params.warmup_ratio if params.warmup_ratio < 1 else total_steps
    config: dict[str, Any] = {
        "beta": params.beta,
        "loss_type": names,
        "loss_weights": weights,
        "label_smoothing": params.label_smoothing,
        "ld_alpha": params.ld_alpha,
        "discopop_tau": params.discopop_tau,
        "learning_rate": params.learning_rate,
        "lr_scheduler_type": params.lr_schedule,
        "warmup_steps": warmup,
        "weight_decay": params.weight_decay,
        "max_grad_norm": params.max_grad_norm if params.max_grad_norm is not None else 0.0,
        "num_train_epochs": params.epochs,
        "per_device_train_batch_size": params.batch_size,
        "gradient_accumulation_steps": params.gradient_accumulation,
        "max_length": params.max_length,
        "truncation_mode": "keep_start",
        "seed": params.seed,
        "report_to": list(params.report_to),
        "gradient_checkpointing": params.gradient_checkpointing,
        # compile None: the worker's choice, compiled on a GPU (the runs that compute in bf16)
        "torch_compile": params.compile if params.compile is not None else bf16,
        "bf16": bf16,
        "disable_dropout": True,
    }
    if params.objective == "sft":  # trl.SFTConfig's names: the loss on the completion (the answer) only
        for name in ("beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha", "discopop_tau"):
            del config[name]
        del config["disable_dropout"]  # SFTConfig has no switch; the trainer turns dropout off
        config["completion_only_loss"] = True
    if params.objective == "reward_model":  # trl.RewardConfig's names (the margin is a dataset column)
        for name in ("beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha", "discopop_tau"):
            del config[name]
        del config["truncation_mode"]  # RewardConfig drops a pair over max_length, as the run does
        config["center_rewards_coefficient"] = params.center_rewards_coefficient
    if params.max_steps is not None:  # else TRL's default, -1: epochs decide
        config["max_steps"] = params.max_steps
    if params.checkpoint_steps is not None:
        config |= {"save_strategy": "steps", "save_steps": params.checkpoint_steps}
    config["use_peft"] = params.lora is not None
    if params.lora is not None:
        lora = params.lora
        config |= {
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "lora_target_modules": lora.target_modules or "all-linear",
        }
    return config


class TrainPolicyIn(StrictJson):
    """An automatic training policy: a job once `min_new_pairs` new unflagged pairs exist."""

    model_config = ConfigDict(extra="forbid")

    min_new_pairs: int = Field(ge=1, le=2**31 - 1)
    base_model: ModelRef | None = None
    enabled: bool = True
    promote: bool = Field(
        False,
        description="After each job's evaluation, make its model this constitution's default for new "
        "jobs when the win rate's lower 95% bound is above 0.5 (reversible: DELETE .../promotion).",
    )
    params: TrainParams = Field(default_factory=TrainParams)

    @model_validator(mode="after")
    def _promote_a_policy(self) -> TrainPolicyIn:
        if self.promote and self.params.objective == "reward_model":
            raise ValueError(
                "promote: a reward model generates nothing, so it cannot be a constitution's model"
            )
        return self

    def db_values(self) -> dict[str, Any]:
        return {
            "min_new_pairs": self.min_new_pairs,
            "base_model": self.base_model,
            "enabled": self.enabled,
            "promote": self.promote,
            "params": self.params.model_dump(mode="json"),
        }
