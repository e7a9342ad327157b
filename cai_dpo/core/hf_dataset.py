"""A Hugging Face Hub dataset folder: Parquet shards per split under `data/`, and a dataset card.

`HubFolder` takes export rows one at a time and writes each to its split's current shard, starting
a new shard once one passes `shard_bytes`; `finish` names the shards `<split>-0000i-of-0000N.parquet`
as the Hub does and returns the row counts. `dataset_card` is a pure function of what the export
knows of the data (constitution versions, models, modes, flags, the filter): `README.md`, whose
YAML header `datasets.load_dataset(folder)` and the Hub read. `tar_chunks` streams a folder as an
uncompressed tar with flat memory (`GET /export?format=hf`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from cai_dpo.core.export_format import Style, parquet_schema, prompt_split

SPLITS = ("train", "test")
TAGS = ["dpo", "preference", "synthetic", "constitutional-ai"]
_ROWS_PER_GROUP = 1000


class _Shard:
    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.batch: list[dict[str, Any]] = []
        self.batch_chars = 0
        self.rows = 0

    def add(self, row: dict[str, Any], chars: int) -> None:
        self.batch.append(row)
        self.batch_chars += chars
        self.rows += 1

    def flush(self) -> None:
        if self.batch:
            self.writer.write_table(pa.Table.from_pylist(self.batch, schema=self.schema))
            self.batch.clear()
            self.batch_chars = 0

    def size(self) -> int:
        """Bytes written so far plus an estimate of the rows not yet written (their characters)."""
        return (self.path.stat().st_size if self.path.exists() else 0) + self.batch_chars

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _row_chars(row: dict[str, Any]) -> int:
    return len(json.dumps(row, ensure_ascii=False))


@dataclass
class HubFolder:
    """Rows in, a Hub-layout folder out (`data/<split>-*.parquet`); the card is written apart."""

    root: Path
    style: Style
    test_fraction: float
    shard_bytes: int = 500 * 2**20
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    _shards: dict[str, list[_Shard]] = field(default_factory=lambda: {s: [] for s in SPLITS})

    def __post_init__(self) -> None:
        self.schema = parquet_schema(self.style, metadata=True)
        (self.root / "data").mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any], prompt: list[dict[str, str]]) -> str:
        """Write an export row (`export_row(..., metadata=True)`) to its prompt's split; the split."""
        split = prompt_split(prompt, self.test_fraction)
        shards = self._shards[split]
        if not shards or shards[-1].size() >= self.shard_bytes:
            if shards:
                shards[-1].close()
            shards.append(_Shard(self.root / "data" / f".{split}-{len(shards)}.parquet", self.schema))
        shard = shards[-1]
        shard.add(row, _row_chars(row))
        if len(shard.batch) >= _ROWS_PER_GROUP or shard.size() >= self.shard_bytes:
            shard.flush()
        self.counts[split] += 1
        return split

    def finish(self) -> dict[str, int]:
        """Close the shards and give them the Hub's names. A split with no row has no file and is
        left out of the card (`datasets` refuses a split without data). Returns rows per split."""
        for split in SPLITS:
            shards = self._shards[split]
            for i, shard in enumerate(shards):
                shard.close()
                shard.path.rename(self.root / "data" / f"{split}-{i:05d}-of-{len(shards):05d}.parquet")
        return dict(self.counts)

    def features(self) -> list[dict[str, Any]]:
        return arrow_features(self.schema)


def _feature(name: str, kind: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(kind):
        item = kind.value_type
        if pa.types.is_struct(item):
            return {"name": name, "list": [_feature(f.name, f.type) for f in item]}
        return {"name": name, "sequence": _dtype(item)}
    return {"name": name, "dtype": _dtype(kind)}


def _dtype(kind: pa.DataType) -> str:
    names = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool"}
    return names[kind]


def arrow_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The `dataset_info.features` of a card, in the Hub's YAML form, for an Arrow schema."""
    return [_feature(f.name, f.type) for f in schema]


@dataclass
class Provenance:
    """What the card says of how the data was made: gathered by the export from the rows and jobs."""

    constitutions: list[dict[str, str]] = field(default_factory=list)  # name, version, body
    models: list[str] = field(default_factory=list)
    modes: list[dict[str, Any]] = field(default_factory=list)  # job id, mode, revisions, sampling
    scorers: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    flag_counts: dict[str, int] = field(default_factory=dict)  # flagged pairs the filter matched
    left_out: dict[str, int] = field(default_factory=dict)  # why -> pairs


def dataset_card(
    *,
    pretty_name: str,
    license: str,
    features: list[dict[str, Any]],
    counts: dict[str, int],
    shards: dict[str, list[str]],
    num_bytes: dict[str, int] | None = None,
    style: Style,
    test_fraction: float,
    filter: dict[str, Any],
    provenance: Provenance,
    repo_id: str | None = None,
) -> str:
    """README.md of a Hub dataset: the YAML header (configs, dataset_info, license, task_categories,
    tags) and a body that says how the data was made and how to load it."""
    total = sum(counts.values())
    present = [s for s in SPLITS if counts.get(s)]
    num_bytes = num_bytes or {}
    size = next(
        (name for limit, name in [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M")]
         if total < limit),
        "n>1M",
    )  # fmt: skip
    header = {
        "license": license,
        "pretty_name": pretty_name,
        "task_categories": ["text-generation"],
        "language": ["en"],
        "size_categories": [size],
        "tags": TAGS,
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in present],
            }
        ],
        "dataset_info": {
            "features": features,
            "splits": [
                {"name": s, "num_bytes": num_bytes.get(s, 0), "num_examples": counts[s]} for s in present
            ],
        },
    }
    out = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000).rstrip(), "---", ""]
    out += [f"# {pretty_name}", ""]
    out += [
        "Preference pairs for DPO made by cai-dpo with a Constitutional AI loop: "
        "a model answers, critiques its answer against a principle of a constitution and revises it; "
        "the revision is `chosen`, the first answer `rejected` (or, with a scorer, the answers it ranked "
        "first and last).",
        "",
        "## Splits",
        "",
        "| split | rows | files |",
        "|---|---|---|",
    ]
    out += [
        f"| {s} | {counts[s]} | {', '.join(f'`{p}`' for p in shards.get(s, [])) or 'none'} |" for s in SPLITS
    ]
    out += [
        "",
        f"The split is by prompt (a hash of its normalised messages, test fraction {test_fraction}): every "
        "pair of a prompt is on one side, the same side as a cai-dpo training job's held-out pairs.",
        "",
        "## Columns",
        "",
        f"TRL's {style} preference format (`prompt`, `chosen`, `rejected`), plus `prompt_id` (sha256 of the "
        "normalised prompt), `messages` (the chosen conversation, an SFT target), `score_chosen` / "
        "`score_rejected` (a scorer's scores; null where none judged the pair), `chosen_model` / "
        "`rejected_model`, and the pair's provenance: `constitution`, `constitution_version`, "
        "`principles`, `flags`, `job_id`, `p_chosen`, `margin`, `scorer`, `review`.",
        "",
        "## How the data was made",
        "",
        f"- Models: {', '.join(f'`{m}`' for m in provenance.models) or 'none recorded (imported pairs)'}",
        f"- Sources: {', '.join(f'`{s}`' for s in provenance.sources) or 'none'}",
        f"- Scorers: {', '.join(f'`{s}`' for s in provenance.scorers) or 'none (chosen is the revision)'}",
    ]
    if provenance.modes:
        out += ["", "### Generation jobs", "", "| job | mode | revisions | sampling |", "|---|---|---|---|"]
        for job in provenance.modes:
            sampling = json.dumps(job.get("sampling") or {}, sort_keys=True)
            out.append(
                f"| {job['job_id']} | {job.get('mode', 'revise')} | {job.get('revisions')} | `{sampling}` |"
            )
    out += ["", "### Selection", "", "The export's filter:", "", "```json"]
    out += [json.dumps(filter, indent=2, sort_keys=True, default=str), "```", ""]
    if provenance.flag_counts:
        out += ["Quality flags among the pairs the filter matched (a flagged pair is left out unless the "
                "filter asks for it):", "", "| flag | pairs |", "|---|---|"]  # fmt: skip
        out += [f"| `{name}` | {n} |" for name, n in sorted(provenance.flag_counts.items())]
        out.append("")
    else:
        out += ["No pair the filter matched carries a quality flag.", ""]
    if provenance.left_out:
        out += [
            "Left out: " + "; ".join(_pairs(n) + f" ({why})" for why, n in provenance.left_out.items()) + ".",
            "",
        ]
    out += ["## Constitutions", ""]
    if not provenance.constitutions:
        out += ["None: the pairs were imported.", ""]
    for c in provenance.constitutions:
        out += [
            f"### {c['name']} (version `{c['version'][:12]}`)",
            "",
            "````markdown",
            c["body"].rstrip(),
            "````",
            "",
        ]
    name = repo_id or "path/to/this/folder"
    out += [
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{name}")',
        'train, test = ds["train"], ds["test"]',
        "# TRL: DPOTrainer(model=..., args=DPOConfig(...), train_dataset=train, eval_dataset=test)",
        "```",
        "",
    ]
    return "\n".join(out)


def _pairs(n: int) -> str:
    return f"{n} pair" if n == 1 else f"{n} pairs"


def tar_chunks(root: Path, *, block: int = 2**20) -> Iterator[bytes]:
    """The folder's files as an uncompressed tar (sorted paths, under `<root name>/`), a block at a
    time: no file is held whole in memory."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = tarfile.TarInfo(f"{root.name}/{path.relative_to(root).as_posix()}")
        info.size = path.stat().st_size
        info.mode = 0o644
        info.mtime = int(path.stat().st_mtime)
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as handle:
            while data := handle.read(block):
                yield data
        if pad := -info.size % tarfile.BLOCKSIZE:
            yield b"\0" * pad
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
