"""Bearer tokens with scopes for the REST API and DICOMweb.

A token is a random string the node never stores: the settings hold its
SHA-256 (``[[api.tokens]]``, or ``api.tokens_file`` with one
``name sha256 scope[,scope]`` a line), so neither the settings nor the audit
trail give a token away. Scopes:

    read      GET /, /status, /jobs, /metrics
    operate   POST /trigger, /reprocess, /purge, /jobs/{id}/retry
    store     STOW-RS (POST /dicom-web/studies)
    worker    the scale-out workers' routes

``Authorization: Bearer <token>``, or HTTP Basic with the token as the
password (any user name), which is what a browser on a ward PC can send to the
status page. With no token configured the API serves everyone, which the
settings allow on loopback only. ``/health`` never needs a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from dicom_node.errors import ConfigError
from dicom_node.settings import ApiSettings, ApiToken, Scope

SCOPES: tuple[str, ...] = get_args(Scope)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and scopes."""

    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))  # no tokens configured (loopback)


class AuthError(Exception):
    """401 (no or unknown token) or 403 (a token without the scope)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def load_tokens(api: ApiSettings) -> list[ApiToken]:
    """The tokens of the settings and of ``tokens_file``; a named file without a token
    is an error, so that a typo cannot open the API."""
    tokens = list(api.tokens)
    if api.tokens_file is not None:
        path = Path(api.tokens_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"api.tokens_file: cannot read {path}: {exc.strerror}") from None
        found = 0
        for number, line in enumerate(lines, start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ConfigError(
                    f"api.tokens_file {path}:{number}: expected 'name sha256 scope[,scope]'"
                )
            name, digest, scopes = fields
            try:
                tokens.append(
                    ApiToken.model_validate(
                        {"name": name, "sha256": digest, "scopes": scopes.split(",")}
                    )
                )
            except ValueError as exc:
                first = str(exc).splitlines()[1:3]
                raise ConfigError(
                    f"api.tokens_file {path}:{number}: {' '.join(s.strip() for s in first)} "
                    f"(scopes: {', '.join(SCOPES)}; sha256: 64 hex digits)"
                ) from None
            found += 1
        if not found:
            raise ConfigError(f"api.tokens_file {path} holds no token")
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ConfigError(f"api tokens: names must be unique ({sorted(names)})")
    return tokens


class Authenticator:
    """The tokens the API accepts. With ``api.tokens_file`` (``api`` given), the file is
    read again when it changes (looked at most once every ``RELOAD_S``), so that a
    token added or revoked takes effect without a restart (before, a revoked token
    was accepted until the node restarted). A changed file that cannot be used (not
    readable, a bad line, no token) admits none of its tokens until it is put right,
    logged once: keeping the old ones would keep a revoked token. The API never turns
    open by a change of the file."""

    RELOAD_S = 1.0

    def __init__(self, tokens: list[ApiToken], api: ApiSettings | None = None) -> None:
        self.tokens = {t.sha256: t for t in tokens}
        self.enabled = bool(tokens)
        self._csrf_key = secrets.token_bytes(32)
        self._api = api if api is not None and api.tokens_file is not None else None
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        if self._api is None:
            return None
        try:
            st = Path(str(self._api.tokens_file)).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        if self._api is None:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.RELOAD_S:
                return
            self._checked = now
            seen = self._signature()
            if seen == self._seen:
                return
            self._seen = seen
            try:
                tokens = load_tokens(self._api)
            except ConfigError as exc:
                tokens = list(self._api.tokens)
                log.error("%s: none of its tokens is accepted until it is put right", str(exc))
            else:
                log.warning(
                    "api.tokens_file read again: %d token(s) accepted (%s)",
                    len(tokens),
                    ", ".join(t.name for t in tokens),
                )
            self.tokens = {t.sha256: t for t in tokens}

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an Authorization header; AuthError(401) if none."""
        if not self.enabled:
            return ANONYMOUS
        self._refresh()
        if not authorization:
            raise AuthError(401, "this route needs a token (Authorization: Bearer ...)")
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            token = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except ValueError:  # binascii.Error, UnicodeDecodeError; and non-ASCII
                # text (a header is read as Latin-1), which dropped the request unanswered
                raise AuthError(401, "malformed Basic credentials") from None
            token = decoded.partition(":")[2]
        else:
            raise AuthError(401, f"unsupported authorization scheme {scheme[:20]}")
        digest = hash_token(token)
        match = None
        for known, entry in self.tokens.items():  # compare all, in constant time each
            if hmac.compare_digest(known, digest):
                match = entry
        if match is None:
            raise AuthError(401, "unknown token")
        return Principal(match.name, frozenset(match.scopes))

    @staticmethod
    def authorize(principal: Principal, scope: str) -> None:
        if not principal.may(scope):
            raise AuthError(403, f"token {principal.name} lacks the {scope} scope")

    def csrf(self, principal: Principal) -> str:
        """A form field the status page's buttons carry: a browser that holds Basic
        credentials cannot be made to post by another site that does not know it."""
        return hmac.new(self._csrf_key, principal.name.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, principal: Principal, value: str) -> bool:
        return hmac.compare_digest(self.csrf(principal), value)
