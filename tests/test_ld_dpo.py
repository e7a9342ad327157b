"""LD-DPO (TRL 1.16's `ld_alpha`) on a real model: every log-prob path of ours (per sequence,
shared prompt, FlexAttention packed, the trainer's) gives the log-probs TRL's DPOTrainer computes
with ld_alpha set, policy and reference alike, and the trainer's step gives TRL's loss. (The loss
math alone, with its gradient: tests/test_loss_family_vs_trl.py.)"""

from __future__ import annotations

import pytest
import torch

from cai_dpo.core.training_params import TrainParams
from tests.fixtures.training import tiny_model
from workers.training.data import (
    collate,
    collate_packed,
    collate_shared_prompt,
    tokenize_pair,
    tokenize_pairs,
)
from workers.training.dpo import mask_windows, packed_logps, pair_logps, sequence_logps
from workers.training.step import accumulate_step, score_pairs

CPU = torch.device("cpu")
LD_ALPHA = 0.3


@pytest.mark.model
def test_length_desensitised_log_probs_and_loss_equal_trls(smollm_tokenizer, hh_pairs, tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = smollm_tokenizer
    # Pairs whose answers differ in length (after truncation), so each has a tail to weight.
    tokenized = [(example, tokenize_pair(tok, example, 96)) for example in hh_pairs[:16]]
    examples = [e for e, p in tokenized if p is not None and len(p.chosen_ids) != len(p.rejected_ids)][:4]
    ids = dict(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    policy, ref = tiny_model("llama", len(tok), 0, **ids), tiny_model("llama", len(tok), 1, **ids)
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
        ld_alpha=LD_ALPHA,
        bf16=False,
        use_cpu=True,
        report_to=[],
    )
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, trl_batch))
        trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, trl_batch))
    trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()

    pairs, _ = tokenize_pairs(tok, examples, 96)
    assert all(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs)  # every pair has a tail
    with torch.no_grad():
        ours = {
            "sequence": sequence_logps(ref, **collate(pairs, tok.pad_token_id), ld_alpha=LD_ALPHA),
            "sequence unpadded": sequence_logps(
                ref, **collate(pairs, tok.pad_token_id), unpad=True, ld_alpha=LD_ALPHA
            ),
            "shared prompt": pair_logps(
                ref, collate_shared_prompt(pairs, tok.pad_token_id), ld_alpha=LD_ALPHA
            ),
            "trainer": torch.cat(score_pairs(ref, pairs, 4, tok.pad_token_id, CPU, ld_alpha=LD_ALPHA)),
        }
        plain = sequence_logps(ref, **collate(pairs, tok.pad_token_id))
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as transformers_flex

    # The GPU's packed path, FlexAttention uncompiled (the CPU compiles it in ~30 s).
    monkeypatch.setattr(
        transformers_flex,
        "compile_friendly_flex_attention",
        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs),
    )
    ref.set_attn_implementation("flex_attention")
    with torch.no_grad():
        flat = collate_packed(pairs, tok.pad_token_id)
        ours["packed"] = packed_logps(ref, flat, mask_windows(ref.config), ld_alpha=LD_ALPHA)
    ref.set_attn_implementation("sdpa")
    for path, logps in ours.items():
        assert torch.allclose(logps, trl_ref, rtol=0, atol=1e-4), path
    assert not torch.allclose(plain, trl_ref, rtol=0, atol=1e-2)  # the weighting bit
    ours_policy = score_pairs(trainer.model, pairs, 4, tok.pad_token_id, CPU, ld_alpha=LD_ALPHA)
    assert torch.allclose(torch.cat(ours_policy), trl_policy, rtol=0, atol=1e-4)

    ours_ref = score_pairs(trainer.ref_model, pairs, 4, tok.pad_token_id, CPU, ld_alpha=LD_ALPHA)
    params = TrainParams(batch_size=4, max_length=96, beta=0.1, ld_alpha=LD_ALPHA)
    metrics = accumulate_step(trainer.model, pairs, *ours_ref, params, tok.pad_token_id, CPU)
    assert metrics["loss"] == pytest.approx(trl_loss, abs=1e-4)
    plain_params = TrainParams(batch_size=4, max_length=96, beta=0.1)
    plain_ref = score_pairs(trainer.ref_model, pairs, 4, tok.pad_token_id, CPU)
    plain_loss = accumulate_step(trainer.model, pairs, *plain_ref, plain_params, tok.pad_token_id, CPU)[
        "loss"
    ]
    assert plain_loss != pytest.approx(trl_loss, abs=2e-4)  # the loss is not plain DPO's
