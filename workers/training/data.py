"""Preference pairs to token ids and padded batches: the chat template, the response boundary, truncation.

Tokenization follows TRL 1.16's `DPOTrainer` so the two see the same tokens: the prompt is rendered
with the generation prompt, the response is whatever the full conversation adds after the prompt's
tokens (content, end-of-turn token and the template's trailing newline), and `keep_start` truncation
cuts prompt + response to `max_length`, dropping pairs whose prompt alone fills it.

Three batch layouts, all giving the same log-probs: `collate` is TRL's (chosen rows, then rejected
rows); `collate_shared_prompt` puts a pair in one padded row so its prompt is computed once (dense
4D mask); `collate_packed` puts every pair of a batch in one row without padding between them, for
FlexAttention block masks on a GPU. `token_batches` cuts pairs into batches by a token budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

log = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True)
class PairExample:
    """A prompt (chat messages, or a string: one user message) and two answers, the preferred first;
    `margin`: how much better chosen is, as its scorer or import recorded it (None: not recorded)."""

    prompt: list[Message] | str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair after truncation; its sequences are prompt + chosen and prompt + rejected.
    `margin`: the least reward gap a reward model's loss asks of it (0: none)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0

    @property
    def num_tokens(self) -> int:
        """Tokens of the two sequences, the prompt counted twice (as TRL processes them)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def packed_tokens(self) -> int:
        """Tokens of the pair with its prompt once (as the shared-prompt layouts process them)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def longest_sequence(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


class TemplateError(ValueError):
    """The chat template does not give a well-formed response span for a pair."""


def _chat_ids(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _drop_double_bos(ids: list[int], bos_token_id: int | None) -> list[int]:
    # A template that writes BOS itself, rendered by a tokenizer that also prepends one, yields two.
    if bos_token_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_token_id:
        return ids[1:]
    return ids


def tokenize_pair(
    tokenizer: Any, example: PairExample, max_length: int, max_prompt_length: int | None = None
) -> TokenizedPair | None:
    """Tokenize a pair with the chat template; None when truncation would leave no response token.

    The response is the part of the full conversation's tokens after the prompt's. If the template
    renders the prompt differently on its own (or tokens merge across the boundary), the response
    starts where the two diverge, as in TRL. A response with no end-of-turn token (EOS or another
    special token, like `<|im_end|>` or `<|eot_id|>`) raises TemplateError: the model would never
    learn to stop.
    """
    bos = tokenizer.bos_token_id
    prompt = (
        [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) else example.prompt
    )
    end_tokens = set(tokenizer.all_special_ids) - {bos, tokenizer.pad_token_id} | {tokenizer.eos_token_id}
    prompt_ids = _drop_double_bos(_chat_ids(tokenizer, prompt, add_generation_prompt=True), bos)
    responses = []
    for answer in (example.chosen, example.rejected):
        messages = [*prompt, {"role": "assistant", "content": answer}]
        responses.append(_drop_double_bos(_chat_ids(tokenizer, messages, add_generation_prompt=False), bos))
    boundary = min(_common_prefix_length(prompt_ids, full) for full in responses)
    if boundary < len(prompt_ids):
        log.warning(
            "the tokenized prompt is not a prefix of prompt + response; the response starts where "
            "they diverge and %r is left out",
            tokenizer.decode(prompt_ids[boundary:]),
        )
    prompt_ids = prompt_ids[:boundary]
    chosen_ids, rejected_ids = (full[boundary:] for full in responses)
    for response in (chosen_ids, rejected_ids):
        if not end_tokens.intersection(response):
            raise TemplateError(f"response {tokenizer.decode(response)!r} has no end-of-turn token")

    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None
    return TokenizedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], example.margin or 0.0)


def tokenize_pairs(
    tokenizer: Any, examples: list[PairExample], max_length: int, max_prompt_length: int | None = None
) -> tuple[list[TokenizedPair], list[int]]:
    """Tokenize many pairs; also return the indices of the examples dropped by truncation."""
    kept, dropped = [], []
    for index, example in enumerate(examples):
        pair = tokenize_pair(tokenizer, example, max_length, max_prompt_length)
        if pair is None:
            dropped.append(index)
        else:
            kept.append(pair)
    return kept, dropped


def prepare_pairs(
    tokenizer: Any,
    train_pairs: list[PairExample],
    eval_pairs: list[PairExample],
    max_length: int,
    max_prompt_length: int | None = None,
    *,
    chosen_only: bool = False,
    whole: bool = False,
    margins: bool = False,
) -> tuple[list[TokenizedPair], list[TokenizedPair], dict[str, Any]]:
    """A run's training and held-out pairs tokenized, and the summary its record keeps.

    `chosen_only` (SFT): the rejected answers are left out (no tokens), so no forward pass computes
    them; the pairs kept are the same as with both answers (truncation drops by prompt length).
    `whole` (a reward model): a pair with a sequence over `max_length` is dropped, not cut, as TRL's
    RewardTrainer does. `margins`: each pair keeps its example's margin (None: 0); else every margin is 0."""
    cut_at = 2**62 if whole else max_length
    train, train_dropped = tokenize_pairs(tokenizer, train_pairs, cut_at, max_prompt_length)
    evals, eval_dropped = tokenize_pairs(tokenizer, eval_pairs, cut_at, max_prompt_length)
    dropped = len(train_dropped) + len(eval_dropped)
    if whole:
        kept = [[p for p in pairs if p.longest_sequence <= max_length] for pairs in (train, evals)]
        dropped += len(train) + len(evals) - len(kept[0]) - len(kept[1])
        train, evals = kept
    if chosen_only:
        train, evals = ([replace(p, rejected_ids=[]) for p in pairs] for pairs in (train, evals))
    if not margins:
        train, evals = ([replace(p, margin=0.0) for p in pairs] for pairs in (train, evals))
    if not train:
        if whole:
            raise ValueError("no training pair's sequences fit within max_length (longer pairs are left out)")
        raise ValueError("no training pair has a response token left within max_length")
    summary = {
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        "dropped_by_truncation": dropped,
        "train_tokens": sum(p.num_tokens for p in train),  # both sequences, as TRL counts them
        "train_packed_tokens": sum(p.packed_tokens for p in train),  # each token once
        "fingerprint": fingerprint(train + evals),
    }
    return train, evals, summary


def collate(batch: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack pairs into one right-padded batch: rows [0, n) are chosen, rows [n, 2n) rejected.

    Padding goes to the longest sequence of this batch only. `loss_mask` marks response tokens.
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in batch] + [(p.prompt_ids, p.rejected_ids) for p in batch]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt) : length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_shared_prompt(batch: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, prompt + chosen + rejected, so the prompt is computed once for both answers.

    The rejected tokens take the positions they would have after the prompt alone and a 4D mask
    hides the chosen tokens from them, so every response token sees exactly the context it has in
    its own sequence: the same log-probs as `collate`, with the prompt's tokens processed once.
    Rows are right-padded; padding positions attend only to themselves (no empty softmax rows).

    `source_row`/`source_pos` say which hidden state predicts each response token (`targets`), and
    `segment` which sequence it belongs to: pair b's chosen answer is b, its rejected one n + b.
    """
    n = len(batch)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch]
    width = max(lengths)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1, 1)
    source_row, source_pos, targets, segment = [], [], [], []
    for row, pair in enumerate(batch):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        length = lengths[row]
        input_ids[row, :length] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
        position_ids[row, :length] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        visible = torch.ones((length, length), dtype=torch.bool).tril()
        visible[p + c :, p : p + c] = False
        attention_mask[row, 0, :length, :length] = visible
        # Token k of an answer is predicted by the hidden state before it; for both answers that is
        # the prompt's last position for k = 0.
        source_row += [row] * (c + r)
        source_pos += [p - 1 + k for k in range(c)] + [p - 1] * (r > 0) + [p + c + k - 1 for k in range(1, r)]
        targets += pair.chosen_ids + pair.rejected_ids
        segment += [row] * c + [n + row] * r
    response_lengths = [len(p.chosen_ids) for p in batch] + [len(p.rejected_ids) for p in batch]
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "lengths": torch.tensor(lengths),
        "source_row": torch.tensor(source_row),
        "source_pos": torch.tensor(source_pos),
        "targets": torch.tensor(targets),
        "segment": torch.tensor(segment),
        "response_lengths": torch.tensor(response_lengths),
    }


# Token roles in `collate_packed`'s row.
KIND_PROMPT, KIND_CHOSEN, KIND_REJECTED, KIND_PAD = 0, 1, 2, 3


def bucket_width(tokens: int, block: int = 128) -> int:
    """The row width for `tokens` packed tokens: the next of block × (1, 2, 3, 4, 6, 8, 12, 16, ...).

    A handful of widths (above two blocks, at most a third of padding) rather than every multiple
    of the block, so compiled kernels meet few shapes: each new one can cost a recompilation.
    """
    width = block
    while width < tokens:
        blocks = width // block
        if blocks == 1:
            width = 2 * block
        elif blocks & (blocks - 1) == 0:  # a power of two: × 3/2
            width = width * 3 // 2
        else:  # 3·2^k: × 4/3
            width = width * 4 // 3
    return width


def collate_packed(
    batch: list[TokenizedPair], pad_token_id: int, multiple: int | None = None
) -> dict[str, torch.Tensor]:
    """Every pair of the batch in one row, prompt + chosen + rejected each, padded only at the end:
    to `bucket_width` (multiples of FlexAttention's 128-token block), or to a multiple of `multiple`.

    `doc` (pair index, -1 for padding), `kind` (KIND_*) and `position_ids` let a mask keep each pair
    causal on its own and the rejected answer blind to the chosen one; the rejected tokens take the
    positions they have after the prompt alone. `source` is the row position whose hidden state
    predicts each response token (`targets`); `segment` says whose it is (chosen b: b, rejected b:
    n + b). All indices are built here, on the host, so the device never has to sync to find them.
    """
    n = len(batch)
    ids: list[int] = []
    positions: list[int] = []
    doc: list[int] = []
    kind: list[int] = []
    source: list[int] = []
    targets: list[int] = []
    segment: list[int] = []
    for b, pair in enumerate(batch):
        start = len(ids)
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        ids += pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        positions += [*range(p + c), *range(p, p + r)]
        doc += [b] * (p + c + r)
        kind += [KIND_PROMPT] * p + [KIND_CHOSEN] * c + [KIND_REJECTED] * r
        # Answer token k is predicted by the hidden state before it; for k = 0 of both answers that
        # is the prompt's last token.
        source += [*range(start + p - 1, start + p + c - 1), *[start + p - 1] * (r > 0)]
        source += range(start + p + c, start + p + c + r - 1)
        targets += pair.chosen_ids + pair.rejected_ids
        segment += [b] * c + [n + b] * r
    tokens = len(ids)
    width = bucket_width(tokens) if multiple is None else -(-tokens // multiple) * multiple
    pad = width - tokens
    return {
        "input_ids": torch.tensor([ids + [pad_token_id] * pad]),
        "position_ids": torch.tensor([positions + [0] * pad]),
        "doc": torch.tensor(doc + [-1] * pad),
        "kind": torch.tensor(kind + [KIND_PAD] * pad),
        "source": torch.tensor(source),
        "targets": torch.tensor(targets),
        "segment": torch.tensor(segment),
        "response_lengths": torch.tensor(
            [len(p.chosen_ids) for p in batch] + [len(p.rejected_ids) for p in batch]
        ),
    }


def token_batches(pairs: list[TokenizedPair], max_tokens: int) -> list[list[int]]:
    """Indices of `pairs` cut, in order, into batches of at most `max_tokens` packed tokens.

    A pair longer than the budget alone makes a batch of one.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, pair in enumerate(pairs):
        if current and used + pair.packed_tokens > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += pair.packed_tokens
    if current:
        batches.append(current)
    return batches


def fingerprint(pairs: list[TokenizedPair]) -> str:
    """Hash of the tokenized data, so a resumed run can tell it was given the same pairs."""
    digest = hashlib.sha256()
    for pair in pairs:
        # A margin only where there is one: runs without margins keep their fingerprints.
        margin = [pair.margin] if pair.margin else []
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, *margin]).encode())
    return digest.hexdigest()
