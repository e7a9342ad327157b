"""Parsing imported preference pairs: TRL standard or conversational rows, HH-RLHF transcripts, or
OpenAI preference fine-tuning lines (`input.messages`, `preferred_output`, `non_preferred_output`).

Pure functions: `parse_pairs` turns JSONL lines into pair rows or a list of errors by line
number; the route stores the rows only when there is no error at all.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cai_dpo.core.storable import find_unstorable

_TURN = re.compile(r"\n\n(Human|Assistant|System): ")
_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
_MESSAGE_ROLES = {"system", "user", "assistant"}


class RowError(ValueError):
    pass


@dataclass(frozen=True)
class ImportedPair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    format: str


def transcript_turns(text: str) -> list[dict[str, str]]:
    """`"\\n\\nHuman: a\\n\\nAssistant: b"` -> chat messages."""
    if not _TURN.match(text):
        raise RowError('a transcript must start with "\\n\\nHuman: "')
    parts = _TURN.split(text)[1:]
    return [
        {"role": _ROLES[role], "content": content.strip()}
        for role, content in zip(parts[::2], parts[1::2], strict=True)
    ]


def _hh_pair(chosen: str, rejected: str) -> ImportedPair:
    chosen_turns, rejected_turns = transcript_turns(chosen), transcript_turns(rejected)
    if chosen_turns[-1]["role"] != "assistant" or rejected_turns[-1]["role"] != "assistant":
        raise RowError("chosen/rejected: a transcript must end with an Assistant turn")
    if chosen_turns[:-1] != rejected_turns[:-1]:
        raise RowError("chosen/rejected: the two transcripts have different prompts")
    return ImportedPair(
        chosen_turns[:-1], chosen_turns[-1]["content"], rejected_turns[-1]["content"], "hh-rlhf"
    )


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"{field}: expected a non-empty list of messages")
    for n, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in _MESSAGE_ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise RowError(f"{field}.{n}: expected {{'role': system|user|assistant, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _single_answer(value: Any, field: str) -> str:
    messages = _messages(value, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(f"{field}: expected exactly one assistant message")
    return messages[0]["content"]


def parse_pair(row: Any) -> ImportedPair:
    """One imported row in any of the accepted formats."""
    if not isinstance(row, dict):
        raise RowError("expected a JSON object")
    if "prompt" not in row and ("preferred_output" in row or "input" in row):
        pair = _openai_pair(row)
    elif "prompt" not in row:
        if isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            return _hh_pair(row["chosen"], row["rejected"])
        raise RowError("prompt: missing (or give HH-RLHF 'chosen'/'rejected' transcripts)")
    else:
        pair = _trl_pair(row)
    if not any(m["role"] == "user" and m["content"].strip() for m in pair.prompt):
        raise RowError("prompt: no user turn with text")
    if pair.prompt[-1]["role"] != "user":
        raise RowError("prompt: the last message must be a user turn")
    if not pair.chosen.strip() or not pair.rejected.strip():
        raise RowError("chosen/rejected: empty answer")
    # Only what is stored is checked: a column the import ignores may hold anything.
    if found := find_unstorable({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}):
        where, reason = found
        raise RowError(f"{where}: {reason}")
    return pair


def _openai_pair(row: dict[str, Any]) -> ImportedPair:
    """OpenAI's preference fine-tuning line: the prompt's messages under `input`, one assistant
    message in each of `preferred_output` and `non_preferred_output`."""
    for field in ("input", "preferred_output", "non_preferred_output"):
        if field not in row:
            raise RowError(f"{field}: missing")
    if not isinstance(row["input"], dict):
        raise RowError("input: expected an object with 'messages'")
    return ImportedPair(
        _messages(row["input"].get("messages"), "input.messages"),
        _single_answer(row["preferred_output"], "preferred_output"),
        _single_answer(row["non_preferred_output"], "non_preferred_output"),
        "openai",
    )


def _trl_pair(row: dict[str, Any]) -> ImportedPair:
    for field in ("chosen", "rejected"):
        if field not in row:
            raise RowError(f"{field}: missing")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            raise RowError("chosen/rejected: a string prompt needs string answers (TRL standard format)")
        if _TURN.match(prompt) and prompt.rstrip().endswith("Assistant:"):  # our own multi-turn export
            messages = transcript_turns(prompt.rstrip().removesuffix("Assistant:").rstrip())
        else:
            messages = [{"role": "user", "content": prompt}]
        return ImportedPair(messages, row["chosen"], row["rejected"], "standard")
    return ImportedPair(
        _messages(prompt, "prompt"),
        _single_answer(row["chosen"], "chosen"),
        _single_answer(row["rejected"], "rejected"),
        "conversational",
    )


class TooManyRows(ValueError):
    pass


def parse_pairs(
    lines: Iterable[str],
    *,
    max_errors: int = 20,
    max_rows: int | None = None,
    max_field_chars: int | None = None,
) -> tuple[list[ImportedPair], list[dict[str, Any]]]:
    """Parse JSONL lines (blank lines skipped); errors carry their 1-based line number.

    `lines` may be a stream: parsing stops at `max_errors` errors, and more than `max_rows` pairs
    raises TooManyRows. A prompt (all messages together) or an answer longer than
    `max_field_chars` is an error of its line.
    """
    pairs, errors = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            pair = parse_pair(json.loads(line))
            if max_field_chars is not None:
                _check_sizes(pair, max_field_chars)
            pairs.append(pair)
        except json.JSONDecodeError as exc:
            errors.append({"line": number, "message": f"invalid JSON: {exc.msg}"})
        except RecursionError:
            errors.append({"line": number, "message": "invalid JSON: nested too deeply"})
        except RowError as exc:
            errors.append({"line": number, "message": str(exc)})
        if len(errors) >= max_errors:
            break
        if max_rows is not None and len(pairs) > max_rows:
            raise TooManyRows(f"more than {max_rows} pairs (CAI_MAX_IMPORT_ROWS)")
    return pairs, errors


def _check_sizes(pair: ImportedPair, max_chars: int) -> None:
    sizes = {
        "prompt": sum(len(m["content"]) for m in pair.prompt),
        "chosen": len(pair.chosen),
        "rejected": len(pair.rejected),
    }
    for field, size in sizes.items():
        if size > max_chars:
            raise RowError(f"{field}: {size} characters; at most {max_chars}")


class UnreadableFile(ValueError):
    pass


def parquet_lines(data: bytes) -> list[str]:
    """A Parquet file's rows as JSON lines, for `parse_pairs` (row n is line n): the columns named
    as in the JSONL formats (`prompt`/`chosen`/`rejected`, or OpenAI's), any others ignored."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError: not a Parquet file
        raise UnreadableFile(f"not a readable Parquet file: {exc}") from None
    return [json.dumps(row, ensure_ascii=False, default=str) for row in table.to_pylist()]


def hub_folder_lines(data: bytes) -> list[str]:
    """A Hugging Face dataset folder as a tar (what `GET /export?format=hf` writes): the rows of its
    Parquet files under `data/` (every split, by path), as JSON lines."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = sorted(
                (
                    m
                    for m in tar.getmembers()
                    if m.isfile() and m.name.endswith(".parquet") and "/data/" in f"/{m.name}"
                ),
                key=lambda m: m.name,
            )
            files = [tar.extractfile(m).read() for m in members]  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnreadableFile(f"not a readable tar: {exc}") from None
    if not files:
        raise UnreadableFile("the tar holds no data/*.parquet file (a Hub dataset folder)")
    return [line for file in files for line in parquet_lines(file)]
