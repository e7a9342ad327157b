"""Trained models shared between hosts: the artifact store (`CAI_ARTIFACT_STORE`).

- Unset (the default): a job's model stays where it was trained, `$CAI_DATA_DIR/training/<job>/model`
  on the training host, and the job records that path. One host, or a data folder every host
  mounts at the same path.
- A folder, e.g. `/mnt/models` (NFS, or any filesystem every host mounts at that path): the
  finished model is copied to `<folder>/<job>/`; the job records that path and every host reads it
  in place.
- An fsspec URL, e.g. `s3://bucket/prefix` (with `s3fs` installed; `gs://` with `gcsfs`, ...;
  `file://` and `memory://` need nothing): the model is uploaded to `<url>/<job>/` and the job
  records that URL; a host that needs it downloads it once into `$CAI_MODELS_DIR/store/`.

A copy is complete once its manifest (`.complete`: every file and its size) exists. It is written
last, so a reader never takes a half-uploaded model; downloads go to a staging folder that is
renamed into place, so a half-downloaded one is never used either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = ".complete"
STORE_CACHE = "store"  # under the models folder: downloaded copies


class ArtifactMissing(LookupError):
    """No complete model at a store location."""


def is_url(location: str) -> bool:
    """An fsspec URL (`s3://...`, `file://...`) rather than a path."""
    return "://" in location


def _manifest(folder: Path) -> dict[str, Any]:
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    return {"files": files}


def publish_model(model_dir: Path, store: str, name: str) -> str:
    """Copy a finished model folder into the store as `name`; return the location a job records
    (a path for a folder store, a URL for an fsspec one). Publishing the same name again is a no-op
    once a complete copy is there."""
    model_dir = Path(model_dir)
    manifest = _manifest(model_dir)
    if not is_url(store):
        return str(_publish_to_folder(model_dir, Path(store).expanduser(), name, manifest))
    import fsspec

    fs, root = fsspec.core.url_to_fs(store)
    dest = f"{root.rstrip('/')}/{name}"
    if fs.exists(f"{dest}/{MANIFEST}"):
        return fs.unstrip_protocol(dest)
    for relative in manifest["files"]:
        target = f"{dest}/{relative}"
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(str(model_dir / relative), target)
    fs.pipe_file(f"{dest}/{MANIFEST}", json.dumps(manifest).encode())
    url = fs.unstrip_protocol(dest)
    log.info("model %s uploaded to %s (%d files)", model_dir, url, len(manifest["files"]))
    return url


def _publish_to_folder(model_dir: Path, store: Path, name: str, manifest: dict[str, Any]) -> Path:
    target = store / name
    if (target / MANIFEST).exists():
        return target
    store.mkdir(parents=True, exist_ok=True)
    staging = store / f".{name}-tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(model_dir, staging)
    (staging / MANIFEST).write_text(json.dumps(manifest))
    if target.exists():  # an incomplete copy left by a crash
        shutil.rmtree(target)
    os.rename(staging, target)
    log.info("model %s copied to %s", model_dir, target)
    return target


def local_copy_dir(url: str, models_dir: Path) -> Path:
    """Where a store URL's model is kept on this host: named by the URL's last part and its hash."""
    import fsspec

    _, path = fsspec.core.url_to_fs(url)
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(models_dir) / STORE_CACHE / f"{PurePosixPath(path.rstrip('/')).name}-{digest}"


def fetch_model(url: str, models_dir: Path) -> Path:
    """The local folder of a model in the store, downloaded on first use (once per host)."""
    import fsspec

    local = local_copy_dir(url, models_dir)
    if (local / MANIFEST).exists():
        return local
    fs, path = fsspec.core.url_to_fs(url)
    try:
        manifest = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    except FileNotFoundError:
        raise ArtifactMissing(f"{url}: no complete model there (no {MANIFEST})") from None
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = local.parent / f".{local.name}-tmp-{uuid.uuid4().hex[:8]}"
    try:
        for relative, size in manifest["files"].items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{path}/{relative}", str(target))
            if target.stat().st_size != size:
                raise ArtifactMissing(f"{url}/{relative}: {target.stat().st_size} bytes, expected {size}")
        (staging / MANIFEST).write_text(json.dumps(manifest))
        try:
            os.rename(staging, local)
        except OSError:
            if not (local / MANIFEST).exists():  # not a concurrent download that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("model %s downloaded to %s", url, local)
    return local
