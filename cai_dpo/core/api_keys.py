"""API keys: named, with scopes, from `CAI_API_KEYS` and a keys file reloaded without a restart.

Scopes: `read` (every GET), `generate` (submit prompts, cancel and retry one's own jobs), `train`
(training jobs and policies), `review` (approve, reject and edit pairs), `admin` (everything:
constitutions, imports, policies, other keys' jobs, the audit log). A key is given as

- `CAI_API_KEYS`: comma-separated entries `SECRET` (named `key1`, `key2`... with every scope) or
  `NAME:SCOPE+SCOPE:SECRET`, e.g. `ci:read+generate:s3cret`;
- `CAI_API_KEYS_FILE`: a YAML file `keys: [{name: alice, scopes: [read, generate], key: ...}]`
  (or `sha256: <hex digest of the key>` instead of `key`, so the file holds no secret). It is
  read again whenever it changes. An invalid file at start stops the service; an edit that leaves
  it invalid withdraws every key of the file (it may have been meant to remove one) until it is
  valid again, and says why in the log. Names are unique across both sources: a key's name is
  whose jobs it may cancel.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

Scope = Literal["read", "generate", "train", "review", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: str  # sha256 of the secret

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    scopes: list[Scope] = Field(min_length=1)
    key: str | None = Field(None, min_length=16)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256")
        return self

    def to_key(self) -> ApiKey:
        digest = self.sha256 or sha256_hex(self.key or "")
        return ApiKey(self.name, frozenset(self.scopes), digest)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


def scoped_idempotency_key(caller: ApiKey, key: str | None) -> str | None:
    """An `Idempotency-Key` as stored: one key's retry never returns another key's job or import.
    Key names hold no ':', so the name ends where the first ':' after the prefix is."""
    return None if key is None else f"key:{caller.name}:{key}"


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class InvalidKeys(ValueError):
    pass


def check_unique_names(keys: list[ApiKey], where: str) -> list[ApiKey]:
    seen: set[str] = set()
    for key in keys:
        if key.name in seen:
            raise InvalidKeys(f"{where}: the key name {key.name!r} is given twice; names must be unique")
        seen.add(key.name)
    return keys


def parse_key_list(text: str) -> list[ApiKey]:
    """`CAI_API_KEYS`: `SECRET` or `NAME:SCOPE+SCOPE:SECRET`, comma-separated."""
    keys = []
    for n, entry in enumerate((e.strip() for e in text.split(",") if e.strip()), 1):
        parts = entry.split(":", 2)
        if len(parts) == 3:
            name, scopes, secret = parts
            unknown = set(scopes.split("+")) - set(SCOPES)
            if unknown or not secret:
                raise ValueError(f"CAI_API_KEYS entry {n}: unknown scope(s) {sorted(unknown)} or no secret")
            keys.append(ApiKey(name, frozenset(scopes.split("+")), sha256_hex(secret)))
        else:
            keys.append(ApiKey(f"key{n}", frozenset(SCOPES), sha256_hex(entry)))
    return check_unique_names(keys, "CAI_API_KEYS")


def load_keys_file(path: Path) -> list[ApiKey]:
    data = yaml.safe_load(path.read_text()) or {}
    return [entry.to_key() for entry in KeysFile.model_validate(data).keys]


class KeyRing:
    """The keys in force: the settings' list plus the file's, re-read when the file changes."""

    def __init__(self, key_list: str, keys_file: Path | None):
        self.static = parse_key_list(key_list)
        self.keys_file = keys_file
        self._file_keys: list[ApiKey] = []
        self._file_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        if keys_file is not None and keys_file.exists():  # invalid at start: refuse to start
            self._file_keys = self._load(keys_file)
            stat = keys_file.stat()
            self._file_stamp = (stat.st_mtime_ns, stat.st_size)

    def _load(self, path: Path) -> list[ApiKey]:
        try:
            keys = load_keys_file(path)
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise InvalidKeys(f"API keys file {path}: {exc}") from exc
        check_unique_names(self.static + keys, f"API keys file {path} beside CAI_API_KEYS")
        return keys

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (a keys file counts even while empty)."""
        return bool(self.static) or self.keys_file is not None

    def refresh(self) -> None:
        if self.keys_file is None:
            return
        try:
            stat = self.keys_file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._file_stamp:
            return
        with self._lock:
            try:
                self._file_keys = self._load(self.keys_file) if stamp is not None else []
                log.info("API keys file %s: %d keys", self.keys_file, len(self._file_keys))
            except InvalidKeys as exc:
                # The edit may have been meant to remove a key: none of the file's keys is vouched for.
                self._file_keys = []
                log.error("%s; the file's keys are refused until it is valid again", exc)
            self._file_stamp = stamp

    def current(self) -> list[ApiKey]:
        self.refresh()
        return self.static + self._file_keys

    def find(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, compared in constant time against every key."""
        digest = sha256_hex(secret)
        found = None
        for key in self.current():
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found
