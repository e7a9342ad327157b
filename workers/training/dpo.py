"""The DPO math as small pure functions: sequence log-probs, the loss variants, the logged metrics.

The loss variants and metric names are those of TRL 1.16's `DPOTrainer`; tests hold the log-probs
and losses equal to TRL's on the same model and batch.

Log-probs run the transformer body, then the LM head only at the positions that predict a response
token, through a chunked fused log-softmax. The head applies the model family's own logit transform
(Gemma-2's final soft-cap, Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's
multiplier, read from the config as TRL does). `check_model` proves on a small copy of the
architecture that this reproduces the model's own forward, and refuses a model whose logits it does
not; it also decides whether the shared-prompt packing (one prompt, two answers, a custom mask) is
exact for this architecture, sliding-window layers included.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.training.data import KIND_CHOSEN, KIND_REJECTED, TokenizedPair, collate_shared_prompt

log = logging.getLogger(__name__)

# Logits held at once by the LM head, in elements (tokens × vocab, fp32): ~128 MB on a CPU, ~512 MB
# on a GPU. 0 means: derive from the device.
_HEAD_CHUNK_ELEMENTS = {"cpu": 2**25, "cuda": 2**27}
_HEAD_CHUNK = 0  # tokens per slice; 0: from _HEAD_CHUNK_ELEMENTS and the vocabulary (tests set it)


class UnsupportedModelError(ValueError):
    """This trainer cannot reproduce the model's log-probs; the message names the model type."""


# --- the LM head ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """What a model family does to `hidden @ head.T` before the softmax: `cap·tanh(scale·z / cap)`."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, z: Tensor) -> Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def logit_transform(config: Any) -> LogitTransform:
    """The logit transform a config declares, read as TRL 1.16's fused LM head reads it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:  # Falcon-H1 multiplies the logits by lm_head_multiplier
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by logits_scaling; HyperCLOVA X multiplies by it.
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    return LogitTransform(1.0 if scale is None else float(scale), float(softcap) if softcap else None)


_MM_OUT_DTYPE_WORKS: dict[str, bool] = {}


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with float32 output: bf16/fp16 operands accumulate in fp32 and are not rounded back."""
    if a.dtype == torch.float32:
        return a @ b
    kind = a.device.type
    if _MM_OUT_DTYPE_WORKS.get(kind, kind == "cuda"):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE_WORKS[kind] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_WORKS[kind] = False
    return (a @ b).float()


def _transformed(z: Tensor, scale: float, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """Transformed fp32 logits, and tanh(·) when soft-capped (the backward needs it). Reuses `z`."""
    if softcap:
        tanh = z.mul_(scale / softcap).tanh_()
        return tanh * softcap, tanh
    if scale != 1.0:
        z.mul_(scale)
    return z, None


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log softmax(T(hidden @ weight.T))[target] per token, one slice of tokens at a time.

    T is the family's logit transform (scale, soft-cap). The matmuls take the hidden states' dtype
    (bf16 on a GPU) and accumulate in fp32; the softmax statistics are fp32. Only the log-partition
    per token is kept for backward, which recomputes each slice's logits: the full (tokens × vocab)
    logits never exist at once.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, scale: float, softcap: float | None, chunk: int
    ) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(hidden.dtype).t()
            log_z = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            logps = torch.empty_like(log_z)
            for start in range(0, hidden.shape[0], chunk):
                end = start + chunk
                logits, _ = _transformed(_mm_f32(hidden[start:end], w), scale, softcap)
                log_z[start:end] = torch.logsumexp(logits, dim=-1)
                logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - log_z[start:end]
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.scale, ctx.softcap, ctx.chunk = scale, softcap, chunk
        return logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, log_z = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        scale, softcap, chunk = ctx.scale, ctx.softcap, ctx.chunk
        grad_hidden = grad_weight = None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(hidden.dtype)
            if want_hidden:
                grad_hidden = torch.empty_like(hidden)
            grad_logps = grad_logps.float()
            slices = range(0, hidden.shape[0], chunk)
            for start in slices:
                end = start + chunk
                h = hidden[start:end]
                g = grad_logps[start:end, None]
                logits, tanh = _transformed(_mm_f32(h, w.t()), scale, softcap)
                # d logp_target / d logits = onehot(target) - softmax(logits), then back through T
                grad = logits.sub_(log_z[start:end, None]).exp_().mul_(-g)
                grad.scatter_add_(1, targets[start:end, None], g)
                if tanh is not None:  # d cap·tanh(scale·z/cap) / dz = scale·(1 - tanh²)
                    grad.mul_(tanh.square_().neg_().add_(1)).mul_(scale)
                elif scale != 1.0:
                    grad.mul_(scale)
                grad = grad.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start:end] = grad @ w
                if want_weight:
                    part = grad.t() @ h if len(slices) == 1 else _mm_f32(grad.t(), h)
                    grad_weight = part if grad_weight is None else grad_weight.add_(part)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def causal_lm(model: nn.Module) -> nn.Module:
    # A peft model wraps the transformers model; its LoRA layers live inside the unwrapped one.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_chunk(vocab: int, device: torch.device) -> int:
    if _HEAD_CHUNK:
        return _HEAD_CHUNK
    return max(16, _HEAD_CHUNK_ELEMENTS.get(device.type, 2**25) // max(1, vocab))


def _token_logps(lm: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """Log-probs of `targets` given the final hidden states before them, through the model's head."""
    transform = logit_transform(lm.config)
    head = lm.get_output_embeddings()
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    if type(head) is nn.Linear and head.bias is None:
        chunk = _head_chunk(head.weight.shape[0], hidden.device)
        return _ChunkedTokenLogProbs.apply(
            hidden, head.weight, targets, transform.scale, transform.softcap, chunk
        )
    # An adapted or biased head: plain logits, still only at the response positions.
    logits = transform.apply(head(hidden).float())
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def length_desensitised_weights(segment: Tensor, n_responses: int, ld_alpha: float) -> Tensor:
    """LD-DPO's weight of each response token (TRL 1.16's `ld_alpha`): 1 up to the length of the
    pair's shorter answer, `ld_alpha` beyond it (only the longer answer has tokens there).

    `segment` gives each token's response, chosen b = b and rejected b = n + b, each response's
    tokens consecutive and in order (every collate here lays them out so). No host sync.
    """
    device = segment.device
    index = torch.arange(segment.shape[0], device=device)
    first = torch.full((n_responses,), segment.shape[0], dtype=index.dtype, device=device)
    first = first.scatter_reduce(0, segment, index, reduce="amin")
    position = index - first[segment]
    lengths = torch.bincount(segment, minlength=n_responses)
    chosen, rejected = lengths.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)
    one = torch.ones((), device=device)
    return torch.where(position < shared[segment], one, one * ld_alpha)


def _response_sums(per_token: Tensor, segment: Tensor, n_responses: int, ld_alpha: float | None) -> Tensor:
    """Each response's log-prob: the sum of its tokens', LD-DPO-weighted when `ld_alpha` is set."""
    if ld_alpha is not None:
        per_token = per_token * length_desensitised_weights(segment, n_responses, ld_alpha)
    sums = torch.zeros(n_responses, dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, segment, per_token)


# --- attention masks -------------------------------------------------------------------------------

# Windows per layer type: {layer type: sliding window or None}, or {None: window} when one mask
# serves every layer. None (the whole mapping): the architecture's masks are not known here.
Windows = dict[str | None, int | None]


def mask_windows(config: Any) -> Windows | None:
    """The attention windows of a config's layers, as its own mask functions read them.

    None when some layer is not plain (sliding-window) attention (state-space, linear or chunked
    layers): then no custom mask can stand in for the model's own.
    """
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if getattr(config, "attention_chunk_size", None) is not None:
        return None
    if types:
        if not set(types) <= {"full_attention", "sliding_attention"}:
            return None
        return {kind: window if kind == "sliding_attention" else None for kind in set(types)}
    return {None: window}


def _shared_masks(windows: Windows, make: Callable[[int | None], Any]) -> Any:
    """One mask when every layer takes the same one, else {layer type: mask} (the models take both)."""
    made: dict[int | None, Any] = {}
    for window in windows.values():
        if window not in made:
            made[window] = make(window)
    if len(made) == 1:
        return next(iter(made.values()))
    return {kind: made[window] for kind, window in windows.items()}


def _dense_masks(lm: nn.Module, packed: dict[str, Tensor], windows: Windows) -> Any:
    """`collate_shared_prompt`'s boolean mask, windowed per layer type, as the attention takes it."""
    visible = packed["attention_mask"]
    positions = packed["position_ids"]
    eager = lm.config._attn_implementation == "eager"  # eager adds the mask to the scores

    def make(window: int | None) -> Tensor:
        mask = visible
        if window is not None:
            distance = positions[:, None, :, None] - positions[:, None, None, :]
            mask = mask & (distance < window)
        if eager:
            mask = torch.zeros(mask.shape, dtype=lm.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(lm.dtype).min
            )
        return mask

    return _shared_masks(windows, make)


def _slice_masks(masks: Any, row: int, length: int) -> Any:
    if isinstance(masks, dict):
        return {kind: mask[row : row + 1, :, :length, :length] for kind, mask in masks.items()}
    return masks[row : row + 1, :, :length, :length]


def flex_block_masks(flat: dict[str, Tensor], windows: Windows) -> Any:
    """FlexAttention block masks for `collate_packed`'s single row: each pair causal on its own,
    the rejected answer blind to the chosen one, sliding windows by position where a layer has one."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc, kind, pos = flat["doc"], flat["kind"], flat["position_ids"][0]
    length = doc.shape[0]

    def visible(b, h, q, kv):
        return (doc[q] == doc[kv]) & (kv <= q) & ((kind[q] != KIND_REJECTED) | (kind[kv] != KIND_CHOSEN))

    def make(window: int | None):
        if window is None:
            mask_mod = visible
        else:

            def mask_mod(b, h, q, kv):
                return visible(b, h, q, kv) & (pos[q] - pos[kv] < window)

        return create_block_mask(mask_mod, None, None, length, length, device=doc.device)

    return _shared_masks(windows, make)


# --- log-probs -----------------------------------------------------------------------------------


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    unpad: bool = False,
    ld_alpha: float | None = None,
) -> Tensor:
    """Sum of log p(token | previous tokens) over the tokens where `loss_mask` is 1, per row.

    Runs the transformer body with the model's own masks (exact for any architecture), then the LM
    head only at the positions that predict a response token (labels shifted by one). Rows must be
    right-padded. With `unpad`, each row runs alone at its own length: no compute on padding,
    which is faster on CPUs where batching gains little. `ld_alpha`: LD-DPO's sums, rows [0, n)
    being the chosen answers of the pairs whose rejected ones are rows [n, 2n) (as `collate`).
    """
    lm = causal_lm(model)
    body = lm.base_model
    lengths = attention_mask.sum(dim=1).tolist()
    targets_mask = loss_mask[:, 1:].bool()
    if unpad:
        hiddens = []
        for row, length in enumerate(lengths):
            out = body(input_ids=input_ids[row : row + 1, :length], use_cache=False).last_hidden_state[0]
            hiddens.append(out[:-1][targets_mask[row, : length - 1]])
        hidden = torch.cat(hiddens)
    else:
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = out[:, :-1][targets_mask]
    targets = input_ids[:, 1:][targets_mask]
    per_token = _token_logps(lm, hidden, targets)
    # Rows of the flat per-token vector, in row-major order of the mask.
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(
        targets_mask.sum(dim=1)
    )
    return _response_sums(per_token, rows, input_ids.shape[0], ld_alpha)


def supports_shared_prompt(model: nn.Module) -> bool:
    """Whether the attention takes the custom 4D masks of `collate_shared_prompt` (sdpa, eager)."""
    lm = causal_lm(model)
    return lm.config._attn_implementation in ("sdpa", "eager") and mask_windows(lm.config) is not None


def pair_logps(
    model: nn.Module,
    packed: dict[str, Tensor],
    *,
    unpad: bool = False,
    windows: Windows | None = None,
    ld_alpha: float | None = None,
) -> Tensor:
    """Chosen then rejected log-probs of pairs packed by `collate_shared_prompt`: a tensor [2 × pairs].

    Same values as `sequence_logps` on the two sequences of each pair, with each prompt run once.
    Sliding-window layers get their window applied by position (`windows`, default: the config's).
    With `unpad`, each row runs alone at its own length (see `sequence_logps`). `ld_alpha`: LD-DPO's.
    """
    lm = causal_lm(model)
    body = lm.base_model
    windows = windows if windows is not None else mask_windows(lm.config)
    if windows is None:
        raise UnsupportedModelError(
            f"model type {lm.config.model_type!r}: its layers are not all attention layers, so pairs "
            "cannot share a prompt; use sequence_logps"
        )
    masks = _dense_masks(lm, packed, windows)
    input_ids, position_ids = packed["input_ids"], packed["position_ids"]
    if unpad:
        lengths = packed["lengths"].tolist()
        hidden = torch.cat(
            [
                body(
                    input_ids=input_ids[row : row + 1, :length],
                    position_ids=position_ids[row : row + 1, :length],
                    attention_mask=_slice_masks(masks, row, length),
                    use_cache=False,
                ).last_hidden_state[0]
                for row, length in enumerate(lengths)
            ]
        )
        starts = torch.cumsum(packed["lengths"], 0) - packed["lengths"]
        flat = starts.to(input_ids.device)[packed["source_row"]] + packed["source_pos"]
    else:
        out = body(input_ids=input_ids, position_ids=position_ids, attention_mask=masks, use_cache=False)
        hidden = out.last_hidden_state.flatten(0, 1)
        flat = packed["source_row"] * input_ids.shape[1] + packed["source_pos"]
    per_token = _token_logps(lm, hidden[flat], packed["targets"])
    return _response_sums(per_token, packed["segment"], packed["response_lengths"].shape[0], ld_alpha)


def packed_logps(
    model: nn.Module, flat: dict[str, Tensor], windows: Windows, *, ld_alpha: float | None = None
) -> Tensor:
    """Chosen then rejected log-probs of pairs packed by `collate_packed`: one row, no padding
    between pairs, FlexAttention block masks. The model must use attn_implementation="flex_attention".

    Every index is precomputed on the host, so the call makes no host sync. `ld_alpha`: LD-DPO's.
    """
    lm = causal_lm(model)
    out = lm.base_model(
        input_ids=flat["input_ids"],
        position_ids=flat["position_ids"],
        attention_mask=flex_block_masks(flat, windows),
        use_cache=False,
    )
    hidden = out.last_hidden_state[0].index_select(0, flat["source"])
    per_token = _token_logps(lm, hidden, flat["targets"])
    return _response_sums(per_token, flat["segment"], flat["response_lengths"].shape[0], ld_alpha)


# --- proving the log-probs on a small copy of the architecture ------------------------------------


@dataclass(frozen=True)
class LogpPlan:
    """How the trainer computes a model's log-probs, proven by `check_model`.

    `windows` is None when the shared-prompt packing is not exact for this architecture (every
    batch then runs the plain per-sequence path); else packing is exact for sequences up to
    `pack_max_length` tokens (None: any length).
    """

    model_type: str
    transform: LogitTransform
    windows: Windows | None
    pack_max_length: int | None = None
    notes: list[str] = field(default_factory=list)

    def packs(self, longest_sequence: int) -> bool:
        return self.windows is not None and (
            self.pack_max_length is None or longest_sequence <= self.pack_max_length
        )


def probe_copy(lm: nn.Module, vocab_size: int | None = 512) -> nn.Module:
    """The same architecture with its first layers only and a small vocabulary, random fp32 weights,
    on the CPU."""
    config = copy.deepcopy(lm.config)
    if vocab_size is not None and getattr(config, "vocab_size", 0) > vocab_size:
        config.vocab_size = vocab_size
    layers = getattr(config, "num_hidden_layers", None)
    types = getattr(config, "layer_types", None)
    if layers:
        keep = min(layers, 2)
        if types:  # keep at least one layer of each type
            keep = max(keep, max(types.index(kind) for kind in set(types)) + 1)
            config.layer_types = list(types[:keep])
        config.num_hidden_layers = keep
    implementation = (
        config._attn_implementation if config._attn_implementation in ("sdpa", "eager") else "sdpa"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            probe = type(lm)._from_config(config, attn_implementation=implementation, dtype=torch.float32)
        except (ValueError, ImportError):
            probe = type(lm)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return probe.eval()


def _own_response_logps(lm: nn.Module, ids: list[int], start: int) -> Tensor:
    """Sum of the model's own log-probs (its full forward and logits) of ids[start:]."""
    input_ids = torch.tensor([ids])
    logits = lm(input_ids=input_ids, use_cache=False).logits[0, start - 1 : -1].float()
    return logits.log_softmax(-1).gather(1, input_ids[0, start:, None]).sum()


def probe_pairs(vocab: int, generator: torch.Generator) -> list[TokenizedPair]:
    def draw(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    return [TokenizedPair(draw(5), draw(4), draw(7)), TokenizedPair(draw(3), draw(6), draw(2))]


def _packing_is_exact(probe: nn.Module, windows: Windows, pairs: list[TokenizedPair]) -> bool:
    packed = collate_shared_prompt(pairs, pad_token_id=0)
    ours = pair_logps(probe, packed, windows=windows)
    own = [_own_response_logps(probe, p.prompt_ids + p.chosen_ids, len(p.prompt_ids)) for p in pairs]
    own += [_own_response_logps(probe, p.prompt_ids + p.rejected_ids, len(p.prompt_ids)) for p in pairs]
    return torch.allclose(ours, torch.stack(own), rtol=1e-5, atol=1e-3)


@torch.no_grad()
def check_model(model: nn.Module) -> LogpPlan:
    """Prove on a small fp32 copy of the architecture how this trainer gets the model's log-probs.

    1. The head: body + fused head (with the config's logit transform) must give the log-probs of the
       model's own forward, also with the head weights scaled up so a soft-cap is far from the
       identity. Otherwise UnsupportedModelError, naming the model type.
    2. Packing: the shared-prompt layout must give each sequence's own log-probs; with a sliding
       window, also once the window is shrunk below the probe's length (the window is then applied
       by position). Where it is not exact, packing is off (or limited to sequences the window does
       not reach) and the plain per-sequence path runs instead.
    """
    lm = causal_lm(model)
    config = lm.config
    model_type = getattr(config, "model_type", type(lm).__name__)
    transform = logit_transform(config)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or not hasattr(lm, "base_model") or lm.base_model is lm:
        raise UnsupportedModelError(f"model type {model_type!r} is not a causal LM with an output head")
    try:
        try:
            probe = probe_copy(lm)
        except Exception:  # noqa: BLE001 - some configs tie other sizes to the vocabulary: keep it whole
            probe = probe_copy(lm, vocab_size=None)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild it means: not proven
        raise UnsupportedModelError(
            f"model type {model_type!r}: cannot build a copy of the architecture to check its "
            f"log-probs ({exc})"
        ) from exc
    vocab = probe.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, 24), generator=generator)
    probe_head = probe.get_output_embeddings().weight
    for attempt in range(2):
        own = probe(input_ids=ids, use_cache=False).logits[0, :-1].float()
        if attempt == 1 or own.std() >= 20:
            break
        # Scale the head (a power of two, exact) until the logits reach a trained model's magnitude.
        probe_head.mul_(2.0 ** math.ceil(math.log2(24 / max(own.std().item(), 1e-3))))
    want = own.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
    hidden = probe.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    got = _token_logps(probe, hidden, ids[0, 1:])
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-3):
        error = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise UnsupportedModelError(
            f"model type {model_type!r}: its logits are not reproduced by hidden @ lm_head.T with "
            f"{transform} (max log-prob error {error:.3g} on a probe); this trainer cannot train it"
        )

    notes: list[str] = []
    windows = mask_windows(config)
    pairs = probe_pairs(vocab, generator)
    if windows is None:
        notes.append("layers other than attention: pairs run as two plain sequences")
        return LogpPlan(model_type, transform, None, None, notes)
    if not _packing_is_exact(probe, windows, pairs):
        notes.append("the shared-prompt mask is not exact for this architecture: plain sequences")
        return LogpPlan(model_type, transform, None, None, notes)
    sliding = [w for w in windows.values() if w is not None]
    pack_max_length = None
    if sliding:
        probe.config.sliding_window = 3  # shorter than the probe sequences: the window bites
        shrunk = mask_windows(probe.config)
        if shrunk is None or not _packing_is_exact(probe, shrunk, pairs):
            pack_max_length = min(sliding)
            notes.append(f"sliding windows: packing only for sequences up to {pack_max_length} tokens")
    return LogpPlan(model_type, transform, windows, pack_max_length, notes)


# --- the loss -------------------------------------------------------------------------------------

# TRL 1.16's DPOTrainer loss names (its `loss_type` list), then the reference-free SimPO (TRL's
# CPOTrainer with loss_type="simpo") and ORPO (TRL's ORPOTrainer).
DPO_LOSS_TYPES = (
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
)
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")
LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES


def needs_reference(loss_types: str | list[str] | tuple[str, ...]) -> bool:
    """Whether any of the losses reads the reference log-probs (all but simpo, orpo and sft do)."""
    names = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    return any(name not in (*REFERENCE_FREE_LOSS_TYPES, "sft") for name in names)


def _one_loss(
    name: str,
    *,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
    chosen_tokens_per_pair: Tensor | float | None,
    discopop_tau: float,
    simpo_gamma: float,
) -> Tensor:
    """Per-pair losses of one loss type, as TRL 1.16 writes it (DPOTrainer._compute_loss,
    CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss): their mean over a batch is TRL's loss."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios

    def lengths() -> tuple[Tensor, Tensor]:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                f"{name} normalises by response length: pass chosen_lengths and rejected_lengths"
            )
        return chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)

    def smoothed_sigmoid(logits: Tensor) -> Tensor:
        return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)

    def sft() -> Tensor:
        # TRL: -mean of the chosen answers' token log-probs over the batch, one scalar; as per-pair
        # terms whose mean is that: -logp_i / (the batch's chosen tokens per pair).
        per_pair = chosen_tokens_per_pair
        if per_pair is None:
            per_pair = lengths()[0].sum() / policy_chosen.shape[0]
        return -policy_chosen / per_pair

    if name == "sigmoid":
        return smoothed_sigmoid(beta * delta)
    if name == "hinge":
        return torch.relu(1 - beta * delta)
    if name == "ipo":
        c_len, r_len = lengths()
        return (chosen_logratios / c_len - rejected_logratios / r_len - 1 / (2 * beta)) ** 2
    if name == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if name == "exo_pair":
        if not 0 < label_smoothing < 1:
            raise ValueError("exo_pair needs 0 < label_smoothing < 1 (EXO recommends 1e-3)")
        logits = beta * delta
        return torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing)) + torch.sigmoid(
            -logits
        ) * (F.logsigmoid(-logits) - math.log(label_smoothing))
    if name == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if name == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if name == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if name == "aot":  # sorted over the batch: per-pair terms are per rank of the sort, not per pair
        logratios = torch.sort(policy_chosen - policy_rejected, dim=0).values
        ref_logratios = torch.sort(ref_chosen - ref_rejected, dim=0).values
        return smoothed_sigmoid(beta * (logratios - ref_logratios))
    if name == "aot_unpaired":
        chosen = torch.sort(chosen_logratios, dim=0).values
        rejected = torch.sort(rejected_logratios, dim=0).values
        return smoothed_sigmoid(beta * (chosen - rejected))
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if name == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta)
    if name == "discopop":
        logits = beta * delta
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if name == "sft":
        return sft()
    if name == "sigmoid_norm":
        c_len, r_len = lengths()
        return -F.logsigmoid(beta * (chosen_logratios / c_len - rejected_logratios / r_len))
    if name == "simpo":  # TRL's CPOTrainer, loss_type="simpo": length-averaged log-probs, margin gamma
        c_len, r_len = lengths()
        return smoothed_sigmoid(beta * (policy_chosen / c_len - policy_rejected / r_len) - simpo_gamma)
    if name == "orpo":  # TRL's ORPOTrainer: NLL of the chosen answers minus β·log σ(log odds ratio)
        c_len, r_len = lengths()
        chosen, rejected = (policy_chosen / c_len).float(), (policy_rejected / r_len).float()
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        return sft() - beta * F.logsigmoid(log_odds)
    raise ValueError(f"unknown loss_type {name!r}")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 as TRL's ORPO does."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str | list[str] | tuple[str, ...] = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    loss_weights: list[float] | tuple[float, ...] | None = None,
    chosen_tokens_per_pair: Tensor | float | None = None,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and implicit rewards of chosen and rejected.

    `loss_type` is one of LOSS_TYPES or a list of them, combined as TRL 1.x does: the sum of each
    loss weighted by `loss_weights` (default 1 each). The mean of the per-pair losses over a batch is
    TRL's loss on that batch. Rewards are β·(log π − log π_ref), or β·(average log π) when the loss
    is reference-free (simpo, orpo: the reference log-probs are not read).

    ipo, sigmoid_norm, simpo and orpo divide log-probs by the response lengths (tokens): pass
    chosen_lengths and rejected_lengths. The sft term (and orpo's NLL) is the mean NLL per chosen
    token: each pair's -log π(chosen) over `chosen_tokens_per_pair` (default: these pairs' mean
    chosen length), so a step cut into micro-batches passes its own mean. sigmoid with
    label_smoothing > 0 is cDPO (TRL 1.16 ignores label_smoothing for sigmoid; at 0 the two agree).
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    if not names or len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss_weights for {len(names)} loss types")
    losses = None
    for name, weight in zip(names, weights, strict=True):
        term = weight * _one_loss(
            name,
            policy_chosen=policy_chosen,
            policy_rejected=policy_rejected,
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            beta=beta,
            label_smoothing=label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            chosen_tokens_per_pair=chosen_tokens_per_pair,
            discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma,
        )
        losses = term if losses is None else losses + term
    if any(name in REFERENCE_FREE_LOSS_TYPES for name in names):  # TRL's CPO/ORPO rewards
        c_len = chosen_lengths.clamp(min=1) if chosen_lengths is not None else 1
        r_len = rejected_lengths.clamp(min=1) if rejected_lengths is not None else 1
        return losses, beta * (policy_chosen / c_len).detach(), beta * (policy_rejected / r_len).detach()
    return (
        losses,
        beta * (policy_chosen - ref_chosen).detach(),
        beta * (policy_rejected - ref_rejected).detach(),
    )


METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


# Objective sft reports TRL SFTTrainer's loss (the mean NLL per answer token) and the chosen
# answers' log-probs: the rewards and the rejected answers (absent) mean nothing there.
SFT_METRIC_NAMES = ("loss", "logps/chosen")


def objective_metrics(objective: str, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics (METRIC_NAMES and others) that mean something for `objective`. A reward model's
    rewards are its head's outputs: TRL RewardTrainer's accuracy, margin and mean_reward, and the
    mean rewards of chosen and rejected; it has no log-probs."""
    if objective == "dpo":
        return metrics
    others = {name: value for name, value in metrics.items() if name not in METRIC_NAMES}
    if objective == "sft":
        return {name: metrics[name] for name in SFT_METRIC_NAMES} | others
    chosen, rejected = metrics["rewards/chosen"], metrics["rewards/rejected"]
    return {
        "loss": metrics["loss"],
        "accuracy": metrics["rewards/accuracies"],
        "margin": metrics["rewards/margins"],
        "mean_reward": (chosen + rejected) / 2,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
    } | others


def batch_metric_sums(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> Tensor:
    """TRL's per-step metrics (METRIC_NAMES) as sums over the pairs, one tensor (no host sync):
    summed across micro-batches and ranks, then divided by the step's pair count, they are the
    step's means whatever the split."""
    return torch.stack(
        [
            losses.detach().sum(),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).float().sum(),
            (chosen_rewards - rejected_rewards).sum(),
            policy_chosen.detach().sum(),
            policy_rejected.detach().sum(),
        ]
    ).float()


def batch_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> dict[str, float]:
    """TRL's per-step metrics, averaged over the pairs given."""
    sums = batch_metric_sums(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    return dict(zip(METRIC_NAMES, (sums / len(losses)).tolist(), strict=True))
