"""Issue 22: a Hugging Face Hub dataset folder with its card (`GET /export?format=hf`), the columns
preference datasets carry (`prompt_id`, `messages`, scores, models)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import yaml

from cai_dpo.core.export_format import parquet_schema, prompt_id
from cai_dpo.core.hf_dataset import Provenance, arrow_features, dataset_card
from tests.helpers import insert_pairs


def card_header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def extract(content: bytes, where: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        tar.extractall(where, filter="data")
    return where / "pairs"


@pytest.mark.unit
def test_prompt_id_is_the_sha256_of_the_normalised_prompt():
    assert prompt_id("What is 2+2?") == hashlib.sha256(b"What is 2+2?").hexdigest()  # UltraFeedback's
    assert prompt_id([{"role": "user", "content": "  What is\n 2+2? "}]) == prompt_id("What is 2+2?")
    multi = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+2?"}]
    assert prompt_id(multi) != prompt_id("What is 2+2?") and len(prompt_id(multi)) == 64


@pytest.mark.unit
def test_card_header_carries_configs_features_license_and_tags():
    features = arrow_features(parquet_schema("conversational", metadata=True))
    assert features[0] == {
        "name": "prompt",
        "list": [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}],
    }
    assert {"name": "principles", "sequence": "string"} in features
    card = dataset_card(
        pretty_name="p",
        license="cc-by-4.0",
        features=features,
        counts={"train": 9, "test": 1},
        shards={"train": ["data/train-00000-of-00001.parquet"], "test": ["data/test-00000-of-00001.parquet"]},
        style="conversational",
        test_fraction=0.1,
        filter={"constitution": "harmless"},
        provenance=Provenance(
            constitutions=[{"name": "harmless", "version": "ab" * 32, "body": "# Harmless\n\nBe kind."}],
            models=["m"],
            modes=[{"job_id": 1, "mode": "revise", "revisions": 1, "sampling": {"temperature": 0.7}}],
            flag_counts={"unchanged": 2},
            left_out={"carry a quality flag": 2},
        ),
    )
    header = card_header(card)
    assert header["license"] == "cc-by-4.0"
    assert header["tags"] == ["dpo", "preference", "synthetic", "constitutional-ai"]
    assert header["task_categories"] == ["text-generation"]
    assert header["configs"][0]["data_files"] == [
        {"split": "train", "path": "data/train-*"},
        {"split": "test", "path": "data/test-*"},
    ]
    assert [(s["name"], s["num_examples"]) for s in header["dataset_info"]["splits"]] == [
        ("train", 9),
        ("test", 1),
    ]
    for text in ("Be kind.", "`m`", "temperature", "| `unchanged` | 2 |", "2 pairs (carry a quality flag)",
                 '"constitution": "harmless"', "load_dataset(", "| train | 9 |"):  # fmt: skip
        assert text in card


@pytest.mark.db
def test_hf_export_is_a_folder_datasets_loads_with_both_splits(client, db, tmp_path):
    from datasets import load_dataset

    insert_pairs(db, 60)
    response = client.get("/export", params={"format": "hf", "license": "mit", "test_fraction": 0.2})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    folder = extract(response.content, tmp_path)
    card = (folder / "README.md").read_text()
    header = card_header(card)
    counts = {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]}
    assert counts["train"] + counts["test"] == 60 and counts["test"] > 0 and header["license"] == "mit"
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    assert "| `unchanged` | 1 |" in card and "1 pair (carry a quality flag)" in card

    dataset = load_dataset(str(folder))
    assert {split: len(dataset[split]) for split in dataset} == counts
    row = dataset["train"][0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["prompt_id"] == prompt_id(row["prompt"])
    assert row["messages"] == row["prompt"] + row["chosen"]
    assert row["score_chosen"] is None and "chosen_model" in row and "rejected_model" in row
    # Every pair of a prompt on one side: the split is the export's own `split`.
    train_ids = client.get("/export", params={"split": "train", "test_fraction": 0.2, "metadata": True})
    assert len(train_ids.text.splitlines()) == counts["train"]


@pytest.mark.db
def test_hf_export_shards_by_size(client, db, tmp_path):
    insert_pairs(db, 3000, flagged_extra=False)
    response = client.get("/export", params={"format": "hf", "shard_mb": 0.05, "test_fraction": 0})
    folder = extract(response.content, tmp_path)
    shards = sorted(p.name for p in (folder / "data").iterdir())
    train = [name for name in shards if name.startswith("train-")]
    assert len(train) > 1 and train[0] == f"train-00000-of-{len(train):05d}.parquet"
    assert shards == train  # an empty split has no file, and the card names no such split
    assert [s["name"] for s in card_header((folder / "README.md").read_text())["dataset_info"]["splits"]] == [
        "train"
    ]
    from datasets import load_dataset

    dataset = load_dataset(str(folder))
    assert list(dataset) == ["train"] and len(dataset["train"]) == 3000


@pytest.mark.db
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "hf", "license": "Not A License"}, "license"),
        ({"format": "hf", "shard_mb": 0}, "shard_mb"),
        ({"format": "zip"}, "format"),
    ],
)
def test_bad_hf_export_parameters(client, params, field):
    response = client.get("/export", params=params)
    assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:")


@pytest.mark.model  # SmolLM2's tokenizer and real TRL steps, as tests/test_trainer_vs_trl.py
def test_trl_dpo_trainer_trains_on_the_exported_folder_unchanged(client, db, smollm_tokenizer, tmp_path):
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    from tests.fixtures.training import tiny_llama

    insert_pairs(db, 24)
    folder = extract(client.get("/export", params={"format": "hf", "test_fraction": 0.25}).content, tmp_path)
    dataset = load_dataset(str(folder))
    config = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=2,
        max_steps=2,
        max_length=64,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=tiny_llama(smollm_tokenizer),
        ref_model=tiny_llama(smollm_tokenizer),
        args=config,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        processing_class=smollm_tokenizer,
    )
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss == result.training_loss  # a number, not NaN


# --- the CLI: `cai-dpo export --hf-folder DIR [--push-to-hub org/name]` ------------------------------


def _tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"pairs/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


_CARD = b'---\nlicense: mit\n---\n\nds = load_dataset("path/to/this/folder")\n'


@pytest.mark.unit
def test_cli_hf_folder_asks_for_the_folder_and_unpacks_it_in_place(tmp_path, monkeypatch):
    from tests.test_cli import cli

    fake = _fake_api(monkeypatch)
    fake.routes[("GET", "/export")] = _tar_of({"README.md": _CARD, "data/train-00000-of-00001.parquet": b"P"})
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an earlier export")
    result = cli(
        "export", "--hf-folder", str(folder), "--license", "mit", "--shard-mb", "100", "--job-id", "3"
    )
    assert result.exit_code == 0, result.output
    assert dict(fake.requests[0].url.params) == {
        "style": "conversational",
        "format": "hf",
        "license": "mit",
        "shard_mb": "100.0",
        "job_id": "3",
    }
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        "data/train-00000-of-00001.parquet",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no partial file or staging folder left


@pytest.mark.unit
def test_cli_push_to_hub_uploads_the_folder_with_a_token_and_refuses_without(tmp_path, monkeypatch):
    import huggingface_hub

    from tests.test_cli import cli

    fake = _fake_api(monkeypatch)
    fake.routes[("GET", "/export")] = _tar_of({"README.md": _CARD})
    folder = tmp_path / "ds"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    refused = cli("export", "--hf-folder", str(folder), "--push-to-hub", "org/name")
    assert refused.exit_code != 0 and "no Hugging Face token" in refused.output and fake.requests == []

    calls = []

    class FakeHfApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw, (Path(kw["folder_path"]) / "README.md").read_text()))

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    result = cli("export", "--hf-folder", str(folder), "--push-to-hub", "org/name")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("token", "hf_x")
    assert calls[1] == ("create_repo", "org/name", {"repo_type": "dataset", "exist_ok": True})
    upload, card = calls[2][1], calls[2][2]
    assert upload == {"folder_path": str(folder), "repo_id": "org/name", "repo_type": "dataset"}
    assert 'load_dataset("org/name")' in card
    assert "https://huggingface.co/datasets/org/name" in result.output


@pytest.mark.unit
def test_cli_export_needs_out_or_hf_folder(tmp_path, monkeypatch):
    from tests.test_cli import cli

    fake = _fake_api(monkeypatch)
    assert "--out FILE or --hf-folder DIR" in cli("export").output
    both = cli("export", "--out", str(tmp_path / "x"), "--hf-folder", str(tmp_path / "d"))
    assert both.exit_code != 0 and "one of them" in both.output
    assert "--license" in cli("export", "--out", str(tmp_path / "x"), "--license", "mit").output
    assert fake.requests == []


def _fake_api(monkeypatch):
    import httpx

    from cai_dpo.cli import client as cli_client
    from tests.test_cli import FakeApi

    fake = FakeApi()
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(fake), **kw))
    monkeypatch.setattr(cli_client, "POLL_SECONDS", 0)
    return fake


# --- OpenAI's preference fine-tuning JSONL: `style=openai`, and the import reads it -----------------


@pytest.mark.unit
def test_parse_openai_preference_line():
    from cai_dpo.core.pair_import import RowError, parse_pair

    line = {
        "input": {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
    }
    pair = parse_pair(line)
    assert (pair.prompt[-1], pair.chosen, pair.rejected, pair.format) == (
        {"role": "user", "content": "Q"},
        "good",
        "bad",
        "openai",
    )
    with pytest.raises(RowError, match="^non_preferred_output: missing"):
        parse_pair({k: v for k, v in line.items() if k != "non_preferred_output"})
    with pytest.raises(RowError, match="^input.messages: expected"):
        parse_pair(line | {"input": {"messages": []}})
    with pytest.raises(RowError, match="^preferred_output: expected exactly one assistant"):
        parse_pair(line | {"preferred_output": [{"role": "user", "content": "x"}]})


@pytest.mark.db
def test_openai_style_export_and_its_import_round_trip(client, db):
    import json

    insert_pairs(db, 5)
    response = client.get("/export", params={"style": "openai", "metadata": True})
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert json.loads(lines[0]) == {
        "input": {"messages": [{"role": "user", "content": "prompt 1"}]},
        "preferred_output": [{"role": "assistant", "content": "chosen 1"}],
        "non_preferred_output": [{"role": "assistant", "content": "rejected 1"}],
    }
    imported = client.post(
        "/datasets/import",
        content=response.content,
        headers={"content-type": "application/x-ndjson"},
        params={"source": "openai-file"},
    )
    assert imported.status_code == 201, imported.text
    assert imported.json()["n_pairs"] == 5 and imported.json()["formats"] == ["openai"]
    again = client.get("/export", params={"style": "openai", "source": "openai-file"})
    assert again.text == response.text


@pytest.mark.db
@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_openai_style_is_jsonl_only(client, fmt):
    response = client.get("/export", params={"style": "openai", "format": fmt})
    assert response.status_code == 422 and response.json()["detail"].startswith("style:")


@pytest.mark.db
def test_console_pairs_page_links_the_hub_folder_of_its_filters(client, db, tmp_path):
    import html
    import re

    insert_pairs(db, 4)
    page = client.get("/ui/pairs", params={"constitution": "harmless"}).text
    (link,) = re.findall(r'href="(/export\?[^"]*format=hf)"', page)
    response = client.get(html.unescape(link))
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    card = (extract(response.content, tmp_path) / "README.md").read_text()
    assert '"constitution": "harmless"' in card


# --- /datasets/import reads Parquet and a Hub dataset folder (item 5) ---------------------------------


@pytest.mark.db
@pytest.mark.parametrize(
    ("params", "media", "formats"),
    [
        ({"format": "hf"}, "application/x-tar", ["conversational"]),
        (
            {"format": "parquet", "style": "standard", "metadata": True},
            "application/vnd.apache.parquet",
            ["standard"],
        ),
    ],
)
def test_import_reads_a_parquet_file_and_a_hub_folder(client, db, params, media, formats):
    insert_pairs(db, 12)
    exported = client.get("/export", params=params)
    response = client.post(
        "/datasets/import",
        content=exported.content,
        headers={"content-type": media},
        params={"source": "back"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["n_pairs"] == 12 and response.json()["formats"] == formats
    original = client.get("/export", params={"source": "test", "style": "standard"}).text.splitlines()
    again = client.get("/export", params={"source": "back", "style": "standard"}).text.splitlines()
    assert sorted(again) == sorted(original)


@pytest.mark.db
@pytest.mark.parametrize("media", ["application/x-tar", "application/vnd.apache.parquet"])
def test_import_refuses_an_unreadable_binary_upload_naming_the_body(client, media):
    response = client.post("/datasets/import", content=b"not a file at all", headers={"content-type": media})
    assert response.status_code == 400 and response.json()["detail"].startswith("body: not a readable")
