"""Trained models shared between hosts through the artifact store: a shared folder read in place,
or an fsspec URL (here `memory://` and `file://`, as `s3://` would be) downloaded once per host."""

import asyncio
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from cai_dpo.core.artifact_store import MANIFEST, ArtifactMissing, fetch_model, local_copy_dir, publish_model
from cai_dpo.core.db import session_scope
from cai_dpo.core.model_sources import ModelNotFound, resolve_model, trained_model_path
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.settings import Settings
from tests.helpers import MODEL, statuses
from workers.training.worker import TrainingWorker


def model_folder(root: Path, name: str = "7-20260101T000000000000") -> Path:
    """A finished job's model folder as the trainer leaves it (small stand-in files)."""
    folder = root / name / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "training_config.json").write_text("{}")
    return folder


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != MANIFEST)
    return names == sorted(p.name for p in b.iterdir() if p.name != MANIFEST) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


@pytest.mark.unit
@pytest.mark.parametrize("protocol", ["memory", "file"])
def test_a_model_uploaded_to_a_url_is_downloaded_once_per_host(tmp_path, protocol):
    model = model_folder(tmp_path / "trainer")
    store = (
        f"memory://cai-{uuid.uuid4().hex[:8]}/models" if protocol == "memory" else f"file://{tmp_path}/bucket"
    )
    url = publish_model(model, store, "7-20260101T000000000000")
    assert url.startswith(f"{protocol}://") and url.endswith(
        "/models/7-20260101T000000000000" if protocol == "memory" else "/bucket/7-20260101T000000000000"
    )
    assert publish_model(model, store, "7-20260101T000000000000") == url  # again: already there

    host_b = tmp_path / "host-b-models"
    local = fetch_model(url, host_b)
    assert local == local_copy_dir(url, host_b) and local.is_relative_to(host_b / "store")
    assert same_files(local, model)
    (local / "model.safetensors").write_bytes(b"the local copy, kept")
    assert (
        fetch_model(url, host_b) == local
        and (local / "model.safetensors").read_bytes() == b"the local copy, kept"
    )
    assert not [p for p in (host_b / "store").iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.unit
def test_an_incomplete_upload_is_never_used(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/cai-{uuid.uuid4().hex[:8]}/half"
    fs.pipe_file(f"{root}/config.json", b"{}")  # files, but no manifest: the upload did not finish
    with pytest.raises(ArtifactMissing, match="no complete model"):
        fetch_model(f"memory://{root}", tmp_path)
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ModelNotFound, match="train:3"):
        resolve_model("train:3", settings, trained_path=f"memory://{root}")
    assert not (tmp_path / "models" / "store").exists() or not any((tmp_path / "models" / "store").iterdir())


@pytest.mark.unit
def test_a_shared_folder_store_is_read_in_place(tmp_path):
    model = model_folder(tmp_path / "trainer")
    path = publish_model(model, str(tmp_path / "shared"), "7-20260101T000000000000")
    assert path == str(tmp_path / "shared" / "7-20260101T000000000000")
    assert same_files(Path(path), model) and (Path(path) / MANIFEST).exists()
    settings = Settings(data_dir=tmp_path / "host-b")
    assert resolve_model("train:7", settings, trained_path=path) == Path(path)  # no copy made
    assert not (tmp_path / "host-b").exists()


@pytest.mark.unit
def test_without_a_store_the_local_folder_is_the_model(tmp_path):
    model = model_folder(tmp_path / "trainer")
    assert Settings().artifact_store == ""
    assert resolve_model("train:7", Settings(data_dir=tmp_path), trained_path=str(model)) == model


def claimed_job(db, worker: TrainingWorker):
    with session_scope(db) as session:
        training_queries.create_training_job(
            session, base_model=MODEL, dataset={"source": "test"}, params={"max_steps": 1, "evaluate": False}
        )
    with session_scope(db) as session:
        return training_queries.claim_training_job(
            session, worker_id=worker.id, lease_seconds=60, max_attempts=3
        )


def finished(model: Path) -> SimpleNamespace:
    return SimpleNamespace(
        status="completed", step=1, total_steps=1, model_dir=model, eval_before=None, eval_after=None
    )


@pytest.mark.db
def test_the_training_worker_stores_the_model_and_another_host_fetches_it(settings, db, tmp_path):
    store = f"memory://cai-{uuid.uuid4().hex[:8]}/models"
    worker = TrainingWorker(
        settings.model_copy(update={"artifact_store": store}), db, url=settings.database_url
    )
    job = claimed_job(db, worker)
    model = model_folder(tmp_path / "trainer", f"{job.id}-20260101T000000000000")
    asyncio.run(worker.settle(job, finished(model), model.parent))

    with session_scope(db) as session:
        recorded = trained_model_path(session, f"train:{job.id}")
    assert recorded.startswith("memory://") and recorded.endswith(f"/{job.id}-20260101T000000000000")
    assert statuses(db, type(job))[job.id][0] == "succeeded"
    # A generation worker on another host: its own models folder, the same database.
    other = settings.model_copy(update={"models_dir_override": tmp_path / "host-b"})
    local = resolve_model(f"train:{job.id}", other, trained_path=recorded)
    assert local.is_relative_to(tmp_path / "host-b" / "store") and same_files(local, model)


@pytest.mark.db
def test_an_unreachable_store_hands_the_job_back_with_the_error(settings, db, tmp_path):
    worker = TrainingWorker(
        settings.model_copy(update={"artifact_store": "nosuchprotocol://bucket"}),
        db,
        url=settings.database_url,
    )
    job = claimed_job(db, worker)
    model = model_folder(tmp_path / "trainer", f"{job.id}-20260101T000000000000")
    asyncio.run(worker.settle(job, finished(model), model.parent))
    with session_scope(db) as session:
        row = training_queries.get_training_job(session, job.id)
        # Queued again (a retry finds the finished model and only uploads it), the error on the job.
        assert row.status == "queued" and row.artifact_path is None
        assert "artifact store nosuchprotocol://bucket" in row.last_error
