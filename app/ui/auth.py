"""The console's session cookie and CSRF tokens, signed with HMAC-SHA256 (`CAI_SESSION_SECRET`).

- Session (`cai_session`, HttpOnly, SameSite=Strict, Path=/ui): the API key's name, a binding to
  that key's secret (an HMAC of its digest: rotating or removing the key ends its sessions), an
  expiry and a nonce, signed. It holds no secret, and the Guard honours it on `/ui` paths only.
  Signing out revokes it on the server too (its nonce is kept in `revoked_sessions` until it
  would have expired), so a copied cookie dies with the sign-out.
- CSRF (`cai_csrf`, HttpOnly, SameSite=Strict, Path=/ui): a random value per browser; the token
  every console form carries (and htmx sends as `X-CSRF-Token`) is an HMAC of it *and of the
  session cookie*, so a page of another site can neither read nor forge it, and a cookie and token
  obtained anonymously (or in another session) are worth nothing beside someone's session. It is
  replaced at each login.

With no `CAI_SESSION_SECRET` a random secret is drawn per process, so sessions end at a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from cai_dpo.core.api_keys import ApiKey, KeyRing

CONSOLE_PREFIX = "/ui"
SESSION_COOKIE = "cai_session"
CSRF_COOKIE = "cai_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 12 * 3600


def is_console(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ConsoleSession:
    key: ApiKey
    nonce: str
    expires: int


class ConsoleAuth:
    def __init__(self, secret: str, keyring: KeyRing):
        self.secret = (secret or secrets.token_hex(32)).encode()
        self.keyring = keyring

    def _mac(self, purpose: str, *parts: str) -> str:
        message = "\x1f".join((purpose, *parts)).encode()
        return _b64(hmac.new(self.secret, message, hashlib.sha256).digest())

    def _binding(self, key: ApiKey) -> str:
        return self._mac("key", key.name, key.digest)[:22]

    # --- sessions ------------------------------------------------------------------------------

    def new_session(self, key: ApiKey, *, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
        claims = {"k": key.name, "b": self._binding(key), "e": expires, "n": secrets.token_urlsafe(8)}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._mac('session', payload)}"

    def session_key(self, cookie: str | None, *, now: float | None = None) -> ApiKey | None:
        """The API key a session cookie stands for, or None (absent, forged, expired, key gone)."""
        found = self.session(cookie, now=now)
        return found.key if found else None

    def session(self, cookie: str | None, *, now: float | None = None) -> ConsoleSession | None:
        """The session a cookie carries, signature, expiry and key checked (revocation is the
        Guard's: it needs the database)."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._mac("session", payload)):
            return None
        try:
            claims = json.loads(_unb64(payload))
            name, binding, expires = str(claims["k"]), str(claims["b"]), int(claims["e"])
            nonce = str(claims["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < (now if now is not None else time.time()):
            return None
        for key in self.keyring.current():
            if key.name == name and hmac.compare_digest(self._binding(key), binding):
                return ConsoleSession(key, nonce, expires)
        return None

    # --- CSRF ----------------------------------------------------------------------------------

    @staticmethod
    def new_csrf_cookie() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, csrf_cookie: str, session_cookie: str | None = None) -> str:
        return self._mac("csrf", csrf_cookie, session_cookie or "")

    def csrf_ok(self, csrf_cookie: str | None, session_cookie: str | None, token: str | None) -> bool:
        if not csrf_cookie or not token:
            return False
        return hmac.compare_digest(token, self.csrf_token(csrf_cookie, session_cookie))
