"""Training parameters: the body of `POST /train`, validated here without importing torch.

Defaults follow TRL 1.16's `DPOConfig` where the two overlap (beta, loss names, label smoothing,
`keep_start` truncation), so a run here and a run with TRL mean the same thing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from cai_dpo.core.evaluation import EvaluationRequest
from cai_dpo.core.model_refs import ModelRef
from cai_dpo.core.strict_json import StrictJson

LossType = Literal["sigmoid", "ipo", "hinge", "robust"]


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


class TrainParams(StrictJson):
    """Hyperparameters of one DPO run."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    loss_type: LossType = Field(
        "sigmoid",
        description="sigmoid: DPO; ipo: IPO on per-token-averaged log-ratios (as TRL); "
        "hinge: SLiC hinge; robust: rDPO with label_smoothing as the label-flip rate.",
    )
    beta: float = Field(0.1, gt=0, description="KL strength; for IPO it is the regulariser tau.")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped. robust: TRL's rDPO. "
        "sigmoid: conservative DPO (cDPO), -(1-e)·logσ(βΔ) - e·logσ(-βΔ). Must be 0 for ipo and hinge.",
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
        description="Most tokens of prompt + response; longer sequences keep their start (as TRL).",
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
    compile: bool = Field(
        False,
        description="torch.compile the decoder layers (GPU only: the first steps pay the compilation).",
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
        "on the held-out prompts (judged), reward accuracy on `evaluation.external`.",
    )
    evaluation: EvaluationRequest | None = Field(
        None, description="How to evaluate (see POST /train/{id}/evaluate); None: the defaults."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainParams:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if self.label_smoothing > 0 and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing has no meaning for loss_type={self.loss_type!r}")
        return self

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation


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

    def db_values(self) -> dict[str, Any]:
        return {
            "min_new_pairs": self.min_new_pairs,
            "base_model": self.base_model,
            "enabled": self.enabled,
            "promote": self.promote,
            "params": self.params.model_dump(mode="json"),
        }
