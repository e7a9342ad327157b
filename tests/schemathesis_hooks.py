"""Schemathesis hooks of `tests/test_openapi_contract.py` (the CLI loads this file: SCHEMATHESIS_HOOKS).

- JSON Lines bodies (`POST /datasets/import`): the document declares them as an array of rows; they
  go on the wire one JSON value per line.
- Every response's status is counted into `$CAI_SCHEMATHESIS_STATUSES` (a JSON object), for the
  figures in docs/RELIABILITY.md and the test's own 5xx check.
- One kind of failure is dropped, for a reason the document cannot change: a schema-valid request
  refused with a 422 whose every error is one of `UNSTATED`, rules the server checks that JSON
  Schema cannot state (a chat's last message is a user turn, fields that must agree in value,
  unique ids in a list of objects); each is in the document's descriptions. A 422 for any other
  reason still fails the test. A multipart upload's file part is JSON Lines, which no schema of a
  binary part can describe: its refusals are dropped too. What JSON Schema can state (how `mode`,
  `scorer` and `verify` go together, a review's edit, the judge of a win rate, model references)
  the document states, and a schema-violating request accepted always fails: bodies are strict
  about JSON's types.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import threading

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

UNSTATED = [
    re.compile(pattern)
    for pattern in (
        # POST /generate: a chat's order and content, the characters of all its messages together
        r"the last message must be a user turn",
        r"a system message may only come first",
        r"^prompts\.\d+\.\d+\.content: empty or whitespace-only prompt$",
        r"^prompts\.\d+: \d+ characters; at most \d+$",
        # a model folder under a root that holds no model (the server's state, not the form)
        r"no Hugging Face model folder \(config\.json\) there",
        r"the job held out no pairs",
        # POST /train, PUT /train/policies: hyperparameters that must agree
        r"max_prompt_length must be smaller than max_length",
        r"label_smoothing has no meaning for loss_type",
        r"loss_weights has \d+ weights for \d+ loss_type entries",
        r"is reference-free: it combines only with 'sft'",
        r"loss_type exo_pair needs label_smoothing > 0",
        r"is TRL's name for \w+: given both, with different values",
        r"is a reward_model setting: not with objective",
        r"lora: give lora or TRL's use_peft and lora_\* names, not both",
        r"evaluation: a reward model generates no answers",
        r"promote: a reward model generates nothing",
        # PUT /constitutions/{name}: ids unique, references to them
        r"duplicate id\(s\)",
        r"is not a principle id",
        # POST /pairs/{id}/review: an edited answer has text
        r"^chosen: empty or whitespace-only answer$",
        # POST /datasets/import: rows whose parts must agree
        r"a transcript must end with an Assistant turn",
        r"the two transcripts have different prompts",
        r"prompt: no user turn with text",
        # free-form JSON (metadata) and YAML text: PostgreSQL stores no NUL character
        r"contains a NUL character",
    )
]

_statuses: collections.Counter[int] = collections.Counter()
_lock = threading.Lock()


@schemathesis.serializer("application/x-ndjson", "application/jsonl", "application/json-lines")
def json_lines(ctx, value) -> bytes:
    rows = value if isinstance(value, list) else [value]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@schemathesis.hook
def after_call(context, case, response) -> None:
    with _lock:
        _statuses[response.status_code] += 1


@atexit.register
def _write_statuses() -> None:
    if path := os.environ.get("CAI_SCHEMATHESIS_STATUSES"):
        with open(path, "w") as out:
            json.dump({str(status): n for status, n in sorted(_statuses.items())}, out)


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """False drops the failure (see the module's docstring)."""
    if isinstance(failure, RejectedPositiveData):
        if (case.media_type or "").startswith("multipart/"):
            return False
        return not (response.status_code == 422 and all(map(_unstated, _messages(response))))
    return True


def _messages(response) -> list[str]:
    try:
        body = json.loads(response.content)
        return [f"{e.get('field')}: {e['message']}" for e in body["errors"]] or ["?"]
    except (ValueError, KeyError, TypeError):
        return ["?"]


def _unstated(message: str) -> bool:
    return any(rule.search(message) for rule in UNSTATED)
