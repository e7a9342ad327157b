"""Constitutions: YAML files in `CAI_CONSTITUTIONS_DIR`, validated with pydantic.

A constitution's name is its file name (`harmless.yaml` -> `harmless`). Files are read on every
use, so an edit on disk is picked up by the next job without a restart; the last good version is
kept in memory so an invalid edit never replaces it. Every version used is stored in Postgres by
content hash (see `queries.store_constitution_version`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai_dpo.core.storable import find_unstorable

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    critique: str = Field(
        min_length=1, description="Asks the model to find what is wrong with its last answer."
    )
    revision: str = Field(min_length=1, description="Asks the model to rewrite its answer without it.")


class FewShotExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)
    principle: str | None = Field(None, description="Principle id whose requests frame this example.")


class ConstitutionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    revisions: int = Field(1, ge=1, le=16, description="Default critique-and-revise rounds.")
    principle_sampling: Literal["random", "sequential", "fixed"] = "random"
    fixed_principle: str | None = Field(
        None, description="Principle id used by `fixed` sampling (default: first)."
    )
    principles: list[Principle] = Field(min_length=1)
    few_shot: list[FewShotExample] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_ids(self) -> ConstitutionSpec:
        ids = [p.id for p in self.principles]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"principles: duplicate id(s) {', '.join(duplicated)}")
        if self.fixed_principle is not None and self.fixed_principle not in ids:
            raise ValueError(f"fixed_principle: {self.fixed_principle!r} is not a principle id")
        for n, example in enumerate(self.few_shot):
            if example.principle is not None and example.principle not in ids:
                raise ValueError(f"few_shot.{n}.principle: {example.principle!r} is not a principle id")
        return self

    def principle(self, principle_id: str) -> Principle:
        return next(p for p in self.principles if p.id == principle_id)


class Constitution(BaseModel):
    """A validated constitution as read from its file."""

    name: str
    path: Path
    text: str
    version: str = Field(description="sha256 of the file's text")
    spec: ConstitutionSpec


class ConstitutionError(ValueError):
    """An invalid constitution, with the file and the field at fault."""

    def __init__(self, message: str, *, path: Path | None = None, field: str | None = None):
        self.message = message
        self.path = path
        self.field = field
        super().__init__(": ".join(str(part) for part in (path, field, message) if part))

    def to_dict(self) -> dict:
        return {"message": self.message, "path": str(self.path) if self.path else None, "field": self.field}


class UnknownConstitution(LookupError):
    pass


def check_name(name: str) -> str:
    """Return `name` if it is a safe constitution name, else raise ConstitutionError."""
    if not _NAME_RE.match(name):
        raise ConstitutionError(
            f"{name!r} must match {NAME_PATTERN} (lower-case letters, digits, '-', '_')", field="name"
        )
    return name


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_constitution(text: str, *, path: Path | None = None) -> ConstitutionSpec:
    """Parse and validate YAML text; errors name the file and the field at fault."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConstitutionError(f"invalid YAML{where}: {getattr(exc, 'problem', exc)}", path=path) from exc
    if not isinstance(data, dict):
        raise ConstitutionError("a constitution must be a YAML mapping", path=path, field="(root)")
    try:
        spec = ConstitutionSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "value_error" and ": " in message:  # our validators say "field: problem"
            field, message = message.split(": ", 1)
        raise ConstitutionError(message, path=path, field=field) from exc
    # After validation: YAML may nest itself (`a: &a [*a]`), a validated spec cannot.
    if found := find_unstorable(spec.model_dump()):  # e.g. a YAML "\0" escape
        where, reason = found
        raise ConstitutionError(reason, path=path, field=where)
    return spec


class ConstitutionStore:
    """Reads constitutions from a folder, keeping the last good version of each."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._last_good: dict[str, Constitution] = {}
        self._errors: dict[str, ConstitutionError] = {}
        self._lock = threading.Lock()

    def path_for(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}.yaml"

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.yaml") if _NAME_RE.match(p.stem))

    def get(self, name: str) -> Constitution:
        """The current version of `name`: the file if valid, else the last good version read."""
        path = self.path_for(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            with self._lock:
                self._last_good.pop(name, None)
            raise UnknownConstitution(f"unknown constitution {name!r}") from None
        try:
            constitution = Constitution(
                name=name,
                path=path,
                text=text,
                version=content_hash(text),
                spec=parse_constitution(text, path=path),
            )
        except ConstitutionError as exc:
            with self._lock:
                self._errors[name] = exc
                if name in self._last_good:
                    return self._last_good[name]
            raise
        with self._lock:
            self._errors.pop(name, None)
            self._last_good[name] = constitution
        return constitution

    def error(self, name: str) -> ConstitutionError | None:
        """The problem with the file on disk, if it is invalid (the last good version is served)."""
        with self._lock:
            return self._errors.get(name)

    def put(self, name: str, text: str) -> Constitution:
        """Validate `text` and replace the file atomically; an invalid text changes nothing."""
        path = self.path_for(name)
        spec = parse_constitution(text, path=path)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        constitution = Constitution(name=name, path=path, text=text, version=content_hash(text), spec=spec)
        with self._lock:
            self._errors.pop(name, None)
            self._last_good[name] = constitution
        return constitution
