"""The export format: TRL-ready rows (`prompt`, `chosen`, `rejected`) written as JSONL or Parquet.

`export_row` and `prompt_split` are pure; the writers turn an iterator of database rows into an
iterator of byte chunks, so `GET /export` streams with flat memory whatever the dataset size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

Style = Literal["standard", "conversational"]
ExportStyle = Literal["standard", "conversational", "openai"]
Split = Literal["train", "test", "all"]

_ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def prompt_key(messages: str | list[dict[str, str]]) -> bytes:
    """A stable digest of a prompt: its messages' roles and contents, whitespace normalised (stripped,
    runs collapsed to one space), so the same prompt stored twice gets the same key. A bare string is
    the single user turn `normalize_prompts` makes of it."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    turns = [[m["role"].strip().lower(), " ".join(m["content"].split())] for m in messages]
    return hashlib.sha256(b"cai-dpo-prompt-split:" + json.dumps(turns, ensure_ascii=False).encode()).digest()


def prompt_id(messages: str | list[dict[str, str]]) -> str:
    """The hex sha256 of a prompt's normalised text, the `prompt_id` UltraFeedback-binarized and
    distilabel datasets carry: a single user turn is its text with whitespace runs collapsed (so a
    plain prompt gets the id those datasets give it), a longer prompt its roles and contents as JSON."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if len(messages) == 1 and messages[0]["role"] == "user":
        text = " ".join(messages[0]["content"].split())
    else:
        turns = [[m["role"].strip().lower(), " ".join(m["content"].split())] for m in messages]
        text = json.dumps(turns, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def key_split(key: bytes, test_fraction: float) -> Literal["train", "test"]:
    """The side of a `prompt_key`: a prompt is `test` at a fraction iff it is at every larger one."""
    return "test" if int.from_bytes(key[:8], "big") / 2**64 < test_fraction else "train"


def prompt_split(messages: str | list[dict[str, str]], test_fraction: float) -> Literal["train", "test"]:
    """Deterministic split by prompt: every pair of a prompt lands on the same side, every time, in
    every process (export `split`, training `eval_fraction` and the evaluation's default prompts)."""
    return key_split(prompt_key(messages), test_fraction)


def in_split(messages: list[dict[str, str]], split: Split, test_fraction: float) -> bool:
    return split == "all" or prompt_split(messages, test_fraction) == split


def prompt_text(messages: list[dict[str, str]]) -> str:
    """A prompt as one string for TRL's standard format.

    A single user turn is its text; anything longer is an HH-RLHF style transcript ending with
    the assistant's cue (use the conversational style to keep roles exact).
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = "".join(f"\n\n{_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def openai_row(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    """One line of OpenAI's preference fine-tuning JSONL (DPO): the prompt's messages as `input`,
    the chosen and rejected answers as one assistant message each."""
    return {
        "input": {"messages": [{"role": m["role"], "content": m["content"]} for m in prompt]},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def export_row(row: Any, *, style: ExportStyle, metadata: bool) -> dict[str, Any]:
    """One TRL DPO example from a pair row (an object with the `stream_pairs` columns), or with
    `style="openai"` one OpenAI preference fine-tuning line (which takes no other field: no metadata)."""
    if style == "openai":
        return openai_row(row.prompt, row.chosen, row.rejected)
    if style == "conversational":
        out: dict[str, Any] = {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in row.prompt],
            "chosen": [{"role": "assistant", "content": row.chosen}],
            "rejected": [{"role": "assistant", "content": row.rejected}],
        }
    else:
        out = {"prompt": prompt_text(row.prompt), "chosen": row.chosen, "rejected": row.rejected}
    if metadata:
        extra = getattr(row, "pair_metadata", None) or {}
        out |= {
            "prompt_id": prompt_id(row.prompt),
            # The chosen conversation: the SFT target of the pair (TRL's and the Hub's `messages`).
            "messages": [{"role": m["role"], "content": m["content"]} for m in row.prompt]
            + [{"role": "assistant", "content": row.chosen}],
            "id": row.id,
            "source": row.source,
            "constitution": row.constitution_name,
            "constitution_version": row.constitution_version,
            "principles": list(row.principles or []),
            "flags": list(row.flags or []),
            "model": row.model,
            # Both answers of a generated pair come from the job's model; an import may name each.
            "chosen_model": extra.get("chosen_model") or row.model,
            "rejected_model": extra.get("rejected_model") or row.model,
            "job_id": row.job_id,
            # The names UltraFeedback-style datasets use; None where no scorer judged the pair.
            "score_chosen": (row.scores or {}).get("chosen"),
            "score_rejected": (row.scores or {}).get("rejected"),
            "p_chosen": (row.preference or {}).get("p_chosen"),
            "margin": row.margin,
            "scorer": row.scorer,
            # The latest human review (approved, rejected), None where no one reviewed it.
            "review": getattr(row, "review", None),
        }
    return out


def jsonl_chunks(rows: Iterable[dict[str, Any]], *, rows_per_chunk: int = 500) -> Iterator[bytes]:
    buffer: list[str] = []
    for row in rows:
        buffer.append(json.dumps(row, ensure_ascii=False))
        if len(buffer) >= rows_per_chunk:
            yield ("\n".join(buffer) + "\n").encode()
            buffer.clear()
    if buffer:
        yield ("\n".join(buffer) + "\n").encode()


_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def parquet_schema(style: Style, metadata: bool) -> pa.Schema:
    text = _MESSAGES if style == "conversational" else pa.string()
    fields = [("prompt", text), ("chosen", text), ("rejected", text)]
    if metadata:
        fields += [
            ("prompt_id", pa.string()),
            ("messages", _MESSAGES),
            ("id", pa.int64()),
            ("source", pa.string()),
            ("constitution", pa.string()),
            ("constitution_version", pa.string()),
            ("principles", pa.list_(pa.string())),
            ("flags", pa.list_(pa.string())),
            ("model", pa.string()),
            ("chosen_model", pa.string()),
            ("rejected_model", pa.string()),
            ("job_id", pa.int64()),
            ("score_chosen", pa.float64()),
            ("score_rejected", pa.float64()),
            ("p_chosen", pa.float64()),
            ("margin", pa.float64()),
            ("scorer", pa.string()),
            ("review", pa.string()),
        ]
    return pa.schema(fields)


class _ChunkSink:
    """A write-only file whose bytes are handed out as they are written."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.position = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


def parquet_chunks(
    rows: Iterable[dict[str, Any]], *, style: Style, metadata: bool, rows_per_group: int = 2000
) -> Iterator[bytes]:
    """Write one row group per `rows_per_group` rows, yielding the file's bytes as they are made."""
    schema = parquet_schema(style, metadata)
    sink = _ChunkSink()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression="zstd")
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= rows_per_group:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch.clear()
            yield sink.take()
    if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    writer.close()
    yield sink.take()
