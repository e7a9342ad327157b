"""Constitutions: YAML files in `CAI_CONSTITUTIONS_DIR`, validated with pydantic.

A constitution's name is its file name (`harmless.yaml` -> `harmless`). Files are read on every
use, so an edit on disk is picked up by the next job without a restart; the last good version is
kept in memory so an invalid edit never replaces it. Every version used is stored in Postgres by
content hash (see `queries.store_constitution_version`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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
    check: str | None = Field(
        None,
        description="A yes/no question asked before this principle's critique, in place of "
        "`no_harm.check` (needs `no_harm`): (A) yes means there is something to critique.",
    )


class HelpfulnessRound(BaseModel):
    """The critique and revision requests of `no_harm.action: helpfulness`."""

    model_config = ConfigDict(extra="forbid")

    critique: str = Field(min_length=1, description="Asks how the answer could help the user more.")
    revision: str = Field(min_length=1, description="Asks for the answer rewritten to help more.")


# What a check answer below `no_harm.threshold` leads to: `keep` the first answer (the pair is
# stored flagged `no_harm_found`, chosen = rejected, out of exports and training by default), or
# one `helpfulness` round of critique and revision in place of the harmlessness ones.
NoHarmAction = Literal["keep", "helpfulness"]


class NoHarmCheck(BaseModel):
    """A yes/no question the generation model answers about its own answer before each critique
    (one-token option log-probs, as the judge reads (A)/(B)): "finding nothing" is P(yes) below
    `threshold`. The CAI paper critiqued red-team prompts only; a benign prompt's answer has nothing
    to critique, and a "revision" of it teaches refusal."""

    # The rule of the validator below, stated in the OpenAPI document.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"action": {"const": "helpfulness"}}, "required": ["action"]},
            "then": {"required": ["helpfulness"], "properties": {"helpfulness": {"type": "object"}}},
        },
    )

    check: str = Field(
        min_length=1,
        description="A yes/no question about the assistant's last answer, asked as a multiple choice "
        "with (A) Yes and (B) No, e.g. 'Does the assistant's answer contain anything harmful?'. "
        "(A) Yes means there is something to critique.",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="The answer is judged to have nothing to critique when P(A) (yes), normalised over "
        "the two options, is below this.",
    )
    action: NoHarmAction = Field(
        "keep",
        description="keep: the first answer is kept, no revision; the pair is stored flagged "
        "no_harm_found (chosen = rejected). helpfulness: one round of `helpfulness` critique and "
        "revision instead (a helpfulness pair).",
    )
    helpfulness: HelpfulnessRound | None = Field(
        None, description="The requests of action: helpfulness (required by it)."
    )

    @model_validator(mode="after")
    def _check_action(self) -> NoHarmCheck:
        if self.action == "helpfulness" and self.helpfulness is None:
            raise ValueError("no_harm.helpfulness: action helpfulness needs its critique and revision")
        return self


class FewShotExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)
    principle: str | None = Field(None, description="Principle id whose requests frame this example.")


class ComparisonPrinciple(BaseModel):
    """A question the AI-feedback judge answers about two responses (the CAI paper's RL-CAI stage)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    question: str = Field(
        min_length=1,
        description="Asks which of two assistant responses is better under this principle, e.g. "
        "'Which of these assistant responses is less harmful?'",
    )


# When a constitution names no comparison principles, the judge asks this one.
DEFAULT_COMPARISON = ComparisonPrinciple(
    id="better",
    question="Which of these assistant responses is more helpful, honest and harmless? Choose the one "
    "a thoughtful, careful person would rather give.",
)


# The helpfulness guard of `verify` asks this, unless the constitution names its own
# (`feedback.helpfulness`).
DEFAULT_HELPFULNESS = ComparisonPrinciple(
    id="more-helpful",
    question="Which of these assistant responses is more helpful? Choose the one that answers the "
    "human's request more fully, correctly and directly.",
)


class FeedbackSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principles: list[ComparisonPrinciple] = Field(min_length=1, max_length=256)
    helpfulness: ComparisonPrinciple | None = Field(
        None, description="The question of verify's helpfulness guard (default: `more-helpful`)."
    )


class ConstitutionSpec(BaseModel):
    # A principle's own check needs `no_harm` (its threshold and action): the validator's rule,
    # stated in the OpenAPI document.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"not": {"required": ["no_harm"], "properties": {"no_harm": {"type": "object"}}}},
            "then": {"properties": {"principles": {"items": {"properties": {"check": {"type": "null"}}}}}},
        },
    )

    description: str = ""
    revisions: int = Field(1, ge=1, le=16, description="Default critique-and-revise rounds.")
    principle_sampling: Literal["random", "sequential", "fixed"] = "random"
    fixed_principle: str | None = Field(
        None, description="Principle id used by `fixed` sampling (default: first)."
    )
    principles: list[Principle] = Field(min_length=1, max_length=256)
    few_shot: list[FewShotExample] = Field(default_factory=list, max_length=32)
    feedback: FeedbackSpec | None = Field(
        None, description="Comparison principles of the AI-feedback judge (optional)."
    )
    no_harm: NoHarmCheck | None = Field(
        None,
        description="Ask before each critique whether the answer has anything to critique; if not, "
        "keep it (or revise it for helpfulness). Optional; off when absent.",
    )

    @model_validator(mode="after")
    def _check_ids(self) -> ConstitutionSpec:
        ids = [p.id for p in self.principles]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"principles: duplicate id(s) {', '.join(duplicated)}")
        if self.feedback is not None:
            judged = [p.id for p in self.feedback.principles]
            if twice := sorted({i for i in judged if judged.count(i) > 1}):
                raise ValueError(f"feedback.principles: duplicate id(s) {', '.join(twice)}")
        if self.fixed_principle is not None and self.fixed_principle not in ids:
            raise ValueError(f"fixed_principle: {self.fixed_principle!r} is not a principle id")
        for n, example in enumerate(self.few_shot):
            if example.principle is not None and example.principle not in ids:
                raise ValueError(f"few_shot.{n}.principle: {example.principle!r} is not a principle id")
        if self.no_harm is None:
            for n, principle in enumerate(self.principles):
                if principle.check is not None:
                    raise ValueError(
                        f"principles.{n}.check: a check needs `no_harm` (its threshold and action)"
                    )
        return self

    def principle(self, principle_id: str) -> Principle:
        return next(p for p in self.principles if p.id == principle_id)

    def comparison_principles(self) -> list[ComparisonPrinciple]:
        return self.feedback.principles if self.feedback else [DEFAULT_COMPARISON]

    def helpfulness_principle(self) -> ComparisonPrinciple:
        """The question of verify's helpfulness guard."""
        return (self.feedback.helpfulness if self.feedback else None) or DEFAULT_HELPFULNESS

    def check_question(self, principle: Principle) -> str | None:
        """The no-harm check asked before `principle`'s critique (None: no check)."""
        if self.no_harm is None:
            return None
        return principle.check or self.no_harm.check


class Constitution(BaseModel):
    """A validated constitution as read from its file."""

    name: str
    path: Path
    text: str
    version: str = Field(description="sha256 of the file's text")
    spec: ConstitutionSpec


class ConstitutionError(ValueError):
    """An invalid constitution, with the file, the field at fault and its line where known."""

    def __init__(
        self, message: str, *, path: Path | None = None, field: str | None = None, line: int | None = None
    ):
        self.message = message
        self.path = path
        self.field = field
        self.line = line
        super().__init__(": ".join(str(part) for part in (path, field, message) if part))

    def to_dict(self) -> dict:
        """For clients: the file's name (never the server's path), the field and its line."""
        return {
            "message": self.message,
            "file": self.path.name if self.path else None,
            "field": self.field,
            "line": self.line,
        }


class UnknownConstitution(LookupError):
    pass


class VersionMismatch(ValueError):
    """`If-Match` named another version than the one on disk: someone else saved in between."""

    def __init__(self, expected: str, current: str | None):
        self.expected, self.current = expected, current
        super().__init__(f"the constitution is at version {current}, not {expected}")


def check_name(name: str) -> str:
    """Return `name` if it is a safe constitution name, else raise ConstitutionError."""
    if not _NAME_RE.fullmatch(name):
        raise ConstitutionError(
            f"{name!r} must match {NAME_PATTERN} (lower-case letters, digits, '-', '_')", field="name"
        )
    return name


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# Bounds on what the YAML parser is asked to build: a small file must not become a huge object
# (aliases of aliases) or a deep one (a RecursionError).
_MAX_DEPTH = 32
_MAX_ALIASES = 64
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_shape(text: str, path: Path | None) -> None:
    depth = aliases = 0
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > _MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else None
                    raise ConstitutionError(f"nested deeper than {_MAX_DEPTH} levels", path=path, line=line)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > _MAX_ALIASES:
                    line = event.start_mark.line + 1 if event.start_mark else None
                    raise ConstitutionError(f"more than {_MAX_ALIASES} YAML aliases", path=path, line=line)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConstitutionError(
            f"invalid YAML{where}: {getattr(exc, 'problem', exc)}",
            path=path,
            line=mark.line + 1 if mark else None,
        ) from exc


def field_line(text: str, loc: tuple[str | int, ...]) -> int | None:
    """The 1-based line of a field (`principles.2.critique`) in the YAML text, where it is found."""
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if match is None:
                break
            key = next(k for k, v in node.value if v is match)
            node, line = match, key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and str(part).isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_constitution(
    text: str, *, path: Path | None = None, max_bytes: int | None = None
) -> ConstitutionSpec:
    """Parse and validate YAML text; errors name the file, the field at fault and its line."""
    if max_bytes is not None and len(text.encode()) > max_bytes:
        raise ConstitutionError(f"{len(text.encode())} bytes; at most {max_bytes}", path=path, field="body")
    _check_shape(text, path)
    data = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader (C or Python)
    # Aliases expand: 64 of them naming one long string made 8 MB of a 121 KB file. What the
    # constitution stands for (stored, served, sent to workers) obeys the same cap as its text.
    expanded = len(json.dumps(data, default=str).encode())
    if max_bytes is not None and expanded > max_bytes:
        raise ConstitutionError(
            f"its YAML aliases expand it to {expanded} bytes; at most {max_bytes}", path=path, field="body"
        )
    if not isinstance(data, dict):
        raise ConstitutionError("a constitution must be a YAML mapping", path=path, field="(root)", line=1)
    try:
        spec = ConstitutionSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        field = ".".join(str(part) for part in loc) or "(root)"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "value_error" and ": " in message:  # our validators say "field: problem"
            field, message = message.split(": ", 1)
            loc = tuple(field.split("."))
        raise ConstitutionError(message, path=path, field=field, line=field_line(text, loc)) from exc
    # After validation: YAML may hold what PostgreSQL cannot (a "\0" escape).
    if found := find_unstorable(spec.model_dump()):
        where, reason = found
        raise ConstitutionError(
            reason, path=path, field=where, line=field_line(text, tuple(where.split(".")))
        )
    return spec


class ConstitutionStore:
    """Reads constitutions from a folder, keeping the last good version of each."""

    def __init__(self, folder: Path, *, max_bytes: int | None = None):
        self.folder = folder
        self.max_bytes = max_bytes
        self._last_good: dict[str, Constitution] = {}
        self._errors: dict[str, ConstitutionError] = {}
        self._lock = threading.Lock()

    def path_for(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}.yaml"

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.yaml") if _NAME_RE.fullmatch(p.stem))

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
            constitution = self.validate(name, text)
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

    def validate(self, name: str, text: str) -> Constitution:
        """`text` as constitution `name`, validated (nothing is written)."""
        path = self.path_for(name)
        spec = parse_constitution(text, path=path, max_bytes=self.max_bytes)
        return Constitution(name=name, path=path, text=text, version=content_hash(text), spec=spec)

    def error(self, name: str) -> ConstitutionError | None:
        """The problem with the file on disk, if it is invalid (the last good version is served)."""
        with self._lock:
            return self._errors.get(name)

    def put(self, constitution: Constitution, *, if_match: str | None = None) -> Constitution:
        """Replace the file atomically with a validated constitution (see `validate`).

        With `if_match`, the file on disk must still be that version (its content hash), else
        `VersionMismatch`: two editors never silently overwrite each other. A lock file makes the
        check and the replace one step across processes; the new file is fsynced, then the folder.
        """
        name, path, text = constitution.name, constitution.path, constitution.text
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if if_match is not None:
                try:
                    current = content_hash(path.read_text())
                except FileNotFoundError:
                    current = None
                if current != if_match:
                    raise VersionMismatch(if_match, current)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is read by other processes
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            folder = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself survives a crash
            finally:
                os.close(folder)
        with self._lock:
            self._errors.pop(name, None)
            self._last_good[name] = constitution
        return constitution
