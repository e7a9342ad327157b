"""What a request may name as a model: one validator for every field that names one.

A model reference is the bundled model, the configured default (`CAI_MODEL`), `train:<id>`, or a
local Hugging Face folder under a configured model root (`CAI_MODEL_ROOTS`, and `CAI_MODELS_DIR`
always), checked after `realpath` so links and `..` cannot lead out of the roots. Anything else
(another folder, `/proc/self/cwd/...`, a URL) is refused with the same message whether it exists
or not, so a client cannot probe the server's filesystem with it.

Fields typed `ModelRef` are checked while the request body is validated (a 422 naming the field):
the API's Guard puts its settings in `current_settings` for the request. Values read back from the
database by a worker have no settings in context and are taken as stored (they were checked when
they were stored).
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from cai_dpo.core.settings import BUNDLED_MODEL, Settings

# The settings of the app serving this request (set by the Guard middleware), for checks that run
# inside body validation.
current_settings: ContextVar[Settings | None] = ContextVar("current_settings", default=None)

TRAINED_PREFIX = "train:"


def model_roots(settings: Settings) -> list[str]:
    """The folders a model path may lie under, links resolved."""
    roots = [settings.models_dir, *(Path(p) for p in settings.model_roots.split(os.pathsep) if p.strip())]
    return [os.path.realpath(root) for root in roots]


# The names below a model root a reference may use: no leading dot (so no `..`), no spaces.
FOLDER_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
MAX_FOLDER_DEPTH = 8
TRAIN_ID = re.compile(r"[1-9][0-9]{0,15}")


def check_model_ref(spec: str, settings: Settings | None) -> str:
    """`spec` if a request may name it as a model, else a ValueError saying what may be named.
    The OpenAPI document states the same rule as a pattern (`app/openapi.py`)."""
    if spec == BUNDLED_MODEL or (settings is not None and spec == settings.model):
        return spec
    if spec.startswith(TRAINED_PREFIX):
        if TRAIN_ID.fullmatch(spec.removeprefix(TRAINED_PREFIX)):
            return spec
        raise ValueError(f"{spec!r}: a trained model is `train:<id>` with a training job's id")
    if settings is None:  # read back from the database: it was checked when it was stored
        return spec
    refusal = ValueError(
        f"{spec!r} is not a model this server offers: name {BUNDLED_MODEL!r}, `train:<id>`, or a "
        "model folder under CAI_MODEL_ROOTS"
    )
    for root in model_roots(settings):
        parts = spec.removeprefix(root + "/").split("/") if spec.startswith(root + "/") else []
        if parts and len(parts) <= MAX_FOLDER_DEPTH and all(FOLDER_PART.fullmatch(p) for p in parts):
            # Links resolved: a link below a root must not lead out of it.
            folder = os.path.realpath(spec)
            if folder.startswith(root + "/"):
                if not os.path.isfile(os.path.join(folder, "config.json")):
                    raise ValueError(f"{spec!r}: no Hugging Face model folder (config.json) there")
                return spec
    raise refusal


def _check(spec: str) -> str:
    return check_model_ref(spec, current_settings.get())


ModelRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1000,
        description=f"`{BUNDLED_MODEL}` (or the server's default model), `train:<id>`, or a model "
        "folder under the server's CAI_MODEL_ROOTS.",
        # The OpenAPI document states the pattern this server takes (app/openapi.py).
        json_schema_extra={"x-model-ref": True},
    ),
    AfterValidator(_check),
]
