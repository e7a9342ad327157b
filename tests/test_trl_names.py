"""TRL's names: `/train` takes TRL's DPOConfig (and ModelConfig LoRA) names as aliases, and a run's
`training_config.json` holds its settings under TRL's names, which trl.DPOConfig builds from."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cai_dpo.core.training_params import (
    RUN_RECORD_KEYS,
    TRL_ALIASES,
    TRL_LORA,
    TRL_MODEL_CONFIG_KEYS,
    LoraParams,
    TrainParams,
    trl_config,
)


def _refusal(body: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        TrainParams.model_validate(body)
    return str(caught.value)


@pytest.mark.unit
def test_trl_names_are_aliases_of_ours():
    params = TrainParams.model_validate(
        {
            "per_device_train_batch_size": 8.0,  # an integral float is an integer, as for batch_size
            "gradient_accumulation_steps": 2,
            "num_train_epochs": 3,
            "lr_scheduler_type": "cosine",
            "save_steps": 20,
            "torch_compile": True,
            "use_peft": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_modules": ["q_proj", "v_proj"],
        }
    )
    assert (params.batch_size, params.gradient_accumulation, params.epochs) == (8, 2, 3)
    assert (params.lr_schedule, params.checkpoint_steps, params.compile) == ("cosine", 20, True)
    assert params.lora == LoraParams(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert TrainParams.model_validate({"use_peft": True}).lora == LoraParams()
    assert TrainParams.model_validate({"use_peft": False}).lora is None
    # Both names with one value: accepted (4 and 4.0 are one JSON number).
    assert TrainParams.model_validate({"batch_size": 4, "per_device_train_batch_size": 4.0}).batch_size == 4
    assert set(params.model_dump()) & (set(TRL_ALIASES) | set(TRL_LORA)) == set()  # stored as ours


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"batch_size": 2, "per_device_train_batch_size": 4},
            "per_device_train_batch_size is TRL's name for batch_size",
        ),
        ({"compile": True, "torch_compile": 1}, "torch_compile is TRL's name for compile"),  # 1 is no true
        ({"lr_schedule": "linear", "lr_scheduler_type": "cosine"}, "lr_scheduler_type is TRL's name"),
        ({"lora_r": 8}, "lora_r: TRL's LoRA names need use_peft: true"),
        ({"use_peft": False, "lora_alpha": 8}, "lora_alpha: TRL's LoRA names need use_peft: true"),
        ({"use_peft": True, "lora": {"r": 8}}, "give lora or TRL's use_peft and lora_* names, not both"),
        ({"use_peft": 1}, "use_peft: a boolean"),
        ({"use_peft": True, "lora_r": 0}, "lora.r"),  # LoraParams' own bounds
        ({"per_device_train_batch_size": 0}, "batch_size"),
        ({"per_device_eval_batch_size": 4}, "per_device_eval_batch_size"),  # not taken: unknown, as before
    ],
)
def test_refused_trl_names_say_why(body, message):
    assert message in _refusal(body)


@pytest.mark.unit
def test_the_schema_lists_trl_names_and_states_their_rules():
    schema = TrainParams.model_json_schema()
    properties = schema["properties"]
    for trl_name, ours in TRL_ALIASES.items():
        assert properties[trl_name]["description"].startswith(f"TRL's name for `{ours}`")
        stripped = {k: v for k, v in properties[ours].items() if k not in ("default", "title", "description")}
        assert {
            k: v for k, v in properties[trl_name].items() if k not in ("title", "description")
        } == stripped
    assert properties["use_peft"]["type"] == "boolean"
    assert properties["lora_r"]["minimum"] == 1 and properties["ld_alpha"]["anyOf"][0]["maximum"] == 1
    rules = json.dumps(schema["allOf"])
    assert '"use_peft": {"const": true}' in rules and '"not": {"required": ["lora"]}' in rules


@pytest.mark.unit
def test_ld_alpha_is_refused_beside_the_losses_that_read_plain_sums():
    assert TrainParams(ld_alpha=0.5, loss_type=["sigmoid", "ipo"]).ld_alpha == 0.5
    assert "not beside ['sft']" in _refusal({"ld_alpha": 0.5, "loss_type": ["sigmoid", "sft"]})
    assert "not beside ['rpo_alpha']" in _refusal({"ld_alpha": 0.5, "rpo_alpha": 1.0})
    assert "not beside ['simpo']" in _refusal({"ld_alpha": 0.5, "loss_type": "simpo"})
    assert "ld_alpha" in _refusal({"ld_alpha": 1.5})


def _dpo_config(config: dict, tmp_path):
    from trl import DPOConfig

    known = {k: v for k, v in config.items() if k not in TRL_MODEL_CONFIG_KEYS + RUN_RECORD_KEYS}
    return DPOConfig(output_dir=str(tmp_path / "trl"), **known)


def _assert_same_run(config: dict, params: TrainParams, total_steps: int, tmp_path) -> None:
    """trl.DPOConfig and trl.ModelConfig built from the file hold the run's values."""
    from trl import ModelConfig

    trl = _dpo_config(config, tmp_path)
    names, weights = params.loss_terms()
    assert trl.loss_type == names and trl.loss_weights == weights
    assert (trl.beta, trl.label_smoothing, trl.ld_alpha) == (
        params.beta,
        params.label_smoothing,
        params.ld_alpha,
    )
    assert (trl.learning_rate, trl.weight_decay, trl.seed) == (
        params.learning_rate,
        params.weight_decay,
        params.seed,
    )
    assert trl.lr_scheduler_type.value == params.lr_schedule
    assert trl.get_warmup_steps(total_steps) == -(-params.warmup_ratio * total_steps // 1)
    assert trl.max_grad_norm == (params.max_grad_norm or 0.0)  # 0: transformers does not clip
    assert trl.num_train_epochs == params.epochs and trl.max_steps == (params.max_steps or -1)
    assert trl.per_device_train_batch_size == params.batch_size
    assert trl.gradient_accumulation_steps == params.gradient_accumulation
    assert (trl.max_length, trl.truncation_mode) == (params.max_length, "keep_start")
    assert (trl.gradient_checkpointing, trl.torch_compile) == (
        params.gradient_checkpointing,
        bool(params.compile),
    )  # None: on a CPU, no
    assert trl.discopop_tau == params.discopop_tau and trl.disable_dropout
    assert trl.report_to == params.report_to
    model = ModelConfig(**{k: config[k] for k in TRL_MODEL_CONFIG_KEYS if k in config})
    assert model.use_peft == (params.lora is not None)
    if params.lora is not None:
        lora = params.lora
        assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (lora.r, lora.alpha, lora.dropout)
        modules = lora.target_modules or "all-linear"
        # ModelConfig makes a one-name list that name
        assert model.lora_target_modules == (modules[0] if len(modules) == 1 else modules)
    # Sent back to /train under TRL's names, the file gives the same settings.
    again = {k: v for k, v in config.items() if k in TrainParams.model_json_schema()["properties"]}
    if again["max_grad_norm"] == 0.0:  # TRL's "no clipping"; ours is null
        again["max_grad_norm"] = None
    again = TrainParams.model_validate(again)
    assert again.loss_terms() == params.loss_terms() and again.lora == params.lora
    assert (again.batch_size, again.epochs, again.lr_schedule) == (
        params.batch_size,
        params.epochs,
        params.lr_schedule,
    )
    assert (again.max_steps, again.max_grad_norm, again.ld_alpha) == (
        params.max_steps,
        params.max_grad_norm,
        params.ld_alpha,
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "body",
    [
        {},
        {"loss_type": "ipo", "beta": 0.3, "max_steps": 7, "max_grad_norm": None, "warmup_ratio": 1.0},
        {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2], "rpo_alpha": 0.5, "seed": 9},
        {"ld_alpha": 0.25, "lr_schedule": "cosine", "gradient_checkpointing": True, "checkpoint_steps": 5},
        {"report_to": "tensorboard", "seed": 4},
        {
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
            "batch_size": 2,
            "gradient_accumulation": 3,
        },
        {"loss_type": "robust", "label_smoothing": 0.1, "epochs": 2, "weight_decay": 0.01, "compile": True},
    ],
    ids=lambda body: ",".join(body) or "defaults",
)
def test_trl_config_builds_a_dpo_config_with_the_runs_values(body, tmp_path):
    params = TrainParams.model_validate(body)
    config = json.loads(json.dumps(trl_config(params, 40, bf16=False)))  # as written and read
    _assert_same_run(config, params, 40, tmp_path)


@pytest.mark.model
def test_a_runs_training_config_json_builds_trls_dpo_config(tiny_model_path, hh_pairs, tmp_path):
    from workers.training.loop import run_training

    params = TrainParams.model_validate(
        {
            "max_length": 96,
            "per_device_train_batch_size": 2,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "ld_alpha": 0.5,
            "use_peft": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_modules": ["q_proj", "v_proj"],
            "eval_fraction": 0.0,
        }
    )
    result = run_training(
        params,
        model_path=tiny_model_path,
        train_pairs=hh_pairs[:4],
        eval_pairs=[],
        output_dir=tmp_path / "run",
    )
    assert result.status == "completed"
    config = json.loads((result.model_dir / "training_config.json").read_text())
    _assert_same_run(config, params, result.total_steps, tmp_path)
    assert config["bf16"] is False  # a CPU run computes in fp32
    # The record the service reads is still there beside TRL's names.
    assert config["params"]["ld_alpha"] == 0.5 and config["steps"] == 2 and config["base_model"]
