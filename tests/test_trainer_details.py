"""Two trainer details TRL and transformers get right: no dropout anywhere, the LoRA adapters' included
(the GPU's FlexAttention path scores the held-out pairs in train mode), and no weight decay on
biases and norm weights."""

from __future__ import annotations

import pytest
import torch

from cai_dpo.core.training_params import LoraParams
from tests.fixtures.training import tiny_run_params
from workers.training.model import load_model
from workers.training.optim import AdamW, MasterAdamW, make_optimizer, param_groups
from workers.training.ranks import Ranks


@pytest.mark.model  # loads a tiny model and wraps it with peft
def test_lora_dropout_is_off_so_train_mode_scores_twice_the_same(tiny_model_path):
    params = tiny_run_params(lora=LoraParams(r=4, alpha=8, dropout=0.5))
    model, _ = load_model(tiny_model_path, params, Ranks.single("cpu"))
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]  # peft made them...
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # ...and they are off
    with torch.no_grad():  # a trained adapter: lora_B is zero at the start, where dropout changes nothing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.train()  # as the FlexAttention path keeps it while scoring the held-out pairs
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, first)


@pytest.mark.model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["AdamW", "MasterAdamW"])
def test_weight_decay_spares_biases_and_norm_weights(tiny_model_path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=dtype)
    model.model.layers[0].mlp.up_proj.bias = torch.nn.Parameter(torch.ones(128, dtype=dtype))  # a bias
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=0.1, weight_decay=0.5)
    # The groups as a checkpoint holds them (whichever optimizer make_optimizer picks): the matrices
    # with decay, then the biases and norm weights (every 1-D parameter) without.
    named = dict(model.named_parameters())
    no_decay = {name for name, p in named.items() if p.ndim < 2}
    assert "model.norm.weight" in no_decay and "model.layers.0.mlp.up_proj.bias" in no_decay
    groups = optimizer.state_dict()["param_groups"]
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [
        (0.5, len(named) - len(no_decay)),
        (0.0, len(no_decay)),
    ]
    if isinstance(optimizer, AdamW | MasterAdamW):  # the torch optimizer's own groups, tensor by tensor
        tensors = optimizer.master_weights if isinstance(optimizer, MasterAdamW) else params
        index = {id(t): i for i, t in enumerate(tensors)}
        names = list(named)
        in_groups = [{names[index[id(t)]] for t in g["params"]} for g in optimizer.optimizer.param_groups]
        assert in_groups == [set(names) - no_decay, no_decay]

    # A step with zero gradients: decay alone moves the matrices and leaves the norms and biases be.
    before = {name: p.detach().clone() for name, p in named.items()}
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.clip_and_step(None)
    for name, p in named.items():
        if name in no_decay:
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name


@pytest.mark.unit
def test_param_groups_leave_out_an_empty_group():
    matrices = [torch.nn.Parameter(torch.ones(2, 2))]
    assert [g["weight_decay"] for g in param_groups(matrices, matrices, 0.1)] == [0.1]


@pytest.mark.model
def test_a_checkpoint_from_before_the_decay_groups_resumes_with_its_moments(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    params = list(model.parameters())
    torch.manual_seed(0)
    old = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5, fused=True)  # one group, as before
    for p in params:
        p.grad = torch.randn_like(p)
    old.step()
    optimizer = make_optimizer(params, lr=0.1, weight_decay=0.5)
    optimizer.load_state_dict(old.state_dict())
    assert [g["weight_decay"] for g in optimizer.optimizer.param_groups] == [0.5, 0.0]
    for p in params:  # each parameter gets its own moments back, whichever group it is in now
        assert torch.equal(optimizer.optimizer.state[p]["exp_avg"], old.state[p]["exp_avg"])
    optimizer.clip_and_step(None)  # and steps on
