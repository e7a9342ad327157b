"""Log-probs of every supported causal-LM family equal the model's own forward, and the loss TRL's.

Tiny random models of five families, each with what sets it apart: Llama (plain), Gemma-2 (final
logit soft-cap, sliding-window layers, head weights scaled up so the cap bites), Cohere
(`logit_scale`), Granite (`logits_scaling`), Qwen2 (a sliding-window layer). The reference is the
model's own forward: its logits, log-softmaxed, at each answer token, one sequence at a time.
"""

from __future__ import annotations

import pytest
import torch

from cai_dpo.core.training_params import TrainParams
from tests.fixtures.training import FAMILIES, own_logps, tiny_model
from workers.training.data import (
    TokenizedPair,
    collate,
    collate_packed,
    collate_shared_prompt,
    tokenize_pairs,
)
from workers.training.dpo import (
    UnsupportedModelError,
    check_model,
    mask_windows,
    packed_logps,
    pair_logps,
    sequence_logps,
)
from workers.training.step import accumulate_step, score_pairs

VOCAB = 96
CPU = torch.device("cpu")
HEAD_SCALE = {"gemma2": 40.0}  # a trained model's logit magnitude: the soft-cap of 2.0 is far from identity


def _pairs() -> list[TokenizedPair]:
    generator = torch.Generator().manual_seed(0)

    def draw(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    # Prompts and answers longer than the sliding window (4): the window decides what a token sees.
    return [
        TokenizedPair(draw(6), draw(5), draw(9)),
        TokenizedPair(draw(3), draw(11), draw(4)),
        TokenizedPair(draw(9), draw(3), draw(3)),
    ]


def _model(family: str, seed: int = 0):
    return tiny_model(family, VOCAB, seed, head_scale=HEAD_SCALE.get(family, 1.0)).eval()


SLIDING = {"gemma2", "qwen2"}  # families whose tiny config has a sliding-window layer (window 4)
FLEX = {"llama", "gemma2", "qwen2"}  # FlexAttention packing, run forward on the CPU


@pytest.mark.model  # torch forwards of five architectures: seconds, not the fast group
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_path_gives_the_models_own_log_probs(family, monkeypatch):
    model, pairs = _model(family), _pairs()
    want = own_logps(model, pairs)
    with torch.no_grad():
        batch, packed = collate(pairs, 0), collate_shared_prompt(pairs, 0)
        paths = {
            "sequence": sequence_logps(model, **batch),
            "sequence unpadded": sequence_logps(model, **batch, unpad=True),
            "shared prompt": pair_logps(model, packed),
            "shared prompt unpadded": pair_logps(model, packed, unpad=True),
        }
    chosen, rejected = score_pairs(model, pairs, 2, 0, CPU)  # the trainer's path, proven by check_model
    paths["trainer"] = torch.cat([chosen, rejected])
    for name, got in paths.items():
        assert torch.allclose(got, want, rtol=0, atol=1e-4), (name, (got - want).abs().max().item())
    plan = check_model(model)
    assert plan.windows is not None and plan.pack_max_length is None  # packing proven exact, windows too

    if family in SLIDING:  # the windows matter, and are applied
        assert 4 in mask_windows(model.config).values()
        with torch.no_grad():
            blind = pair_logps(model, packed, windows={None: None})
        assert (blind - want).abs().max() > 1e-2  # a full causal mask would be wrong

    if family in FLEX:  # the GPU layout (all pairs in one row, FlexAttention block masks)
        from torch.nn.attention.flex_attention import flex_attention
        from transformers.integrations import flex_attention as transformers_flex

        # Uncompiled FlexAttention: the CPU compiles it in ~30 s, and the mask logic is what is tested.
        monkeypatch.setattr(
            transformers_flex,
            "compile_friendly_flex_attention",
            lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs),
        )
        model.set_attn_implementation("flex_attention")
        with torch.no_grad():
            got = packed_logps(model, collate_packed(pairs, 0), mask_windows(model.config))
        assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max().item()
        model.set_attn_implementation("sdpa")

    if family == "gemma2":  # the soft-cap matters at trained magnitudes
        model.config.final_logit_softcapping = None  # what the trainer did before: no cap
        with torch.no_grad():
            uncapped = sequence_logps(model, **batch)
        assert (uncapped - want).abs().max() > 10


@pytest.mark.unit
def test_packed_layout_indices():
    pair = TokenizedPair([10, 11, 12], [20, 21], [30, 31, 32])
    flat = collate_packed([pair, TokenizedPair([40, 41], [50], [60])], pad_token_id=0, multiple=8)
    assert flat["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 40, 41, 50, 60, 0, 0, 0, 0]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 2, 0, 0, 0, 0]]
    assert flat["doc"].tolist() == [0] * 8 + [1] * 4 + [-1] * 4
    # Each answer token is predicted by the token before it in its own sequence.
    assert flat["source"].tolist() == [2, 3, 2, 5, 6, 9, 9]
    assert flat["targets"].tolist() == [20, 21, 30, 31, 32, 50, 60]
    assert flat["segment"].tolist() == [0, 0, 2, 2, 2, 1, 3]


class _RescaledLlama:
    """A Llama whose forward scales its logits by 3 with nothing in its config saying so."""

    @staticmethod
    def build():
        from transformers import LlamaForCausalLM

        class RescaledLlama(LlamaForCausalLM):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * 3
                return out

        model = tiny_model("llama", VOCAB)
        rescaled = RescaledLlama(model.config)
        rescaled.load_state_dict(model.state_dict())
        return rescaled


@pytest.mark.model  # forwards of a tiny model and of check_model's copy
def test_a_model_whose_logits_are_not_reproduced_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="model type 'llama'.*cannot train it"):
        check_model(_RescaledLlama.build())
    with pytest.raises(UnsupportedModelError, match="model type 'llama'"):
        score_pairs(_RescaledLlama.build(), _pairs(), 2, 0, CPU)


@pytest.mark.model
# Llama: test_trainer_vs_trl's TRL test makes the same checks, for every loss variant.
@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "llama"])
def test_log_probs_and_loss_equal_trls(family, smollm_tokenizer, hh_pairs, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, examples = smollm_tokenizer, hh_pairs[:4]
    vocab = len(tok)
    ids = dict(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    scale = HEAD_SCALE.get(family, 1.0)
    policy = tiny_model(family, vocab, 0, head_scale=scale, **ids)
    ref = tiny_model(family, vocab, 1, head_scale=scale, **ids)
    rows = [
        {
            "prompt": p.prompt,
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in examples
    ]
    config = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(rows),
        max_length=96,
        beta=0.1,
        bf16=False,
        use_cpu=True,
        report_to=[],
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, trl_batch))
        trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, trl_batch))
    trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()

    pairs, _ = tokenize_pairs(tok, examples, 96)
    assert max(p.longest_sequence for p in pairs) > 4  # the sliding windows bite
    ours_ref = score_pairs(trainer.ref_model, pairs, 4, tok.pad_token_id, CPU)
    ours_policy = score_pairs(trainer.model, pairs, 4, tok.pad_token_id, CPU)
    assert torch.allclose(torch.cat(ours_ref), trl_ref, rtol=0, atol=1e-3)
    assert torch.allclose(torch.cat(ours_policy), trl_policy, rtol=0, atol=1e-3)
    params = TrainParams(batch_size=4, max_length=96, beta=0.1)
    metrics = accumulate_step(trainer.model, pairs, *ours_ref, params, tok.pad_token_id, CPU)
    assert metrics["loss"] == pytest.approx(trl_loss, abs=1e-4)
    # The model's own forward agrees with both.
    own = own_logps(trainer.ref_model.eval(), pairs)
    assert torch.allclose(torch.cat(ours_ref), own, rtol=0, atol=1e-3)
