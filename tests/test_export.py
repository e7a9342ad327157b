"""`GET /export`: TRL's two dataset formats as JSONL and Parquet, filters, the deterministic split
(by prompt: tests/test_held_out.py)."""

import io
import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from cai_dpo.core.export_format import export_row, prompt_text
from tests.helpers import insert_pairs


@pytest.mark.unit
def test_export_row_formats():
    row = SimpleNamespace(
        id=3,
        prompt=[{"role": "user", "content": "Q?"}],
        chosen="good",
        rejected="bad",
        source="generated",
        constitution_name="harmless",
        constitution_version="abc",
        principles=["harm"],
        flags=[],
        model="m",
        job_id=1,
        scores=None,  # no scorer judged it
        preference=None,
        margin=None,
        scorer=None,
    )
    assert export_row(row, style="standard", metadata=False) == {
        "prompt": "Q?",
        "chosen": "good",
        "rejected": "bad",
    }
    conversational = export_row(row, style="conversational", metadata=True)
    assert conversational["prompt"] == [{"role": "user", "content": "Q?"}]
    assert conversational["chosen"] == [{"role": "assistant", "content": "good"}]
    assert conversational["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert conversational["id"] == 3 and conversational["principles"] == ["harm"]
    assert conversational["score_chosen"] is conversational["p_chosen"] is conversational["scorer"] is None
    multi = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
    ]
    assert prompt_text(multi) == "\n\nSystem: S\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:"


@pytest.mark.db
@pytest.mark.parametrize("style", ["standard", "conversational"])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_loads_with_datasets_in_trl_columns(client, db, tmp_path, style, fmt):
    from datasets import load_dataset  # Hugging Face's loader, as TRL reads a dataset

    insert_pairs(db, 20)
    response = client.get("/export", params={"format": fmt, "style": style})
    assert response.status_code == 200
    path = tmp_path / f"pairs.{fmt}"
    path.write_bytes(response.content)
    dataset = load_dataset("json" if fmt == "jsonl" else "parquet", data_files=str(path), split="train")
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert len(dataset) == 20  # the flagged pair is left out by default
    first = dataset[0]
    if style == "standard":
        assert first == {"prompt": "prompt 1", "chosen": "chosen 1", "rejected": "rejected 1"}
    else:
        assert first["prompt"] == [{"role": "user", "content": "prompt 1"}]
        assert first["chosen"] == [{"role": "assistant", "content": "chosen 1"}]


@pytest.mark.db
def test_export_filters_split_and_metadata(client, db):
    insert_pairs(db, 50)

    def ids(**params):
        body = client.get("/export", params={"metadata": True, **params}).content.decode()
        return [json.loads(line)["id"] for line in body.splitlines()]

    every = ids()
    assert every == list(range(1, 51))
    assert len(ids(include_flagged=True)) == 51
    train, test = ids(split="train", test_fraction=0.3), ids(split="test", test_fraction=0.3)
    assert sorted(train + test) == every and not set(train) & set(test) and test
    assert test == ids(split="test", test_fraction=0.3)  # deterministic
    assert ids(constitution="helpful-honest") == []
    assert ids(job_id=99) == []
    row = json.loads(client.get("/export", params={"metadata": True}).content.decode().splitlines()[0])
    assert row["source"] == "test" and row["principles"] == ["harm"] and row["flags"] == []


@pytest.mark.db
def test_parquet_export_is_written_in_row_groups(client, db):
    insert_pairs(db, 4500, flagged_extra=False)
    response = client.get("/export", params={"format": "parquet", "metadata": True})
    table = pq.ParquetFile(io.BytesIO(response.content))
    assert table.metadata.num_rows == 4500 and table.metadata.num_row_groups == 3


@pytest.mark.db
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"style": "chatml"}, "style"),
        ({"split": "validation"}, "split"),
        ({"test_fraction": 2}, "test_fraction"),
        ({"job_id": "x"}, "job_id"),
        ({"since": "yesterday"}, "since"),
    ],
)
def test_bad_export_parameters(client, params, field):
    response = client.get("/export", params=params)
    assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:")
