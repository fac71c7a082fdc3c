"""Bearer tokens: generation, hashing, token files, verification and SDK credentials.

A token is ``rk_`` plus 43 URL-safe characters (256 random bits). The server never stores one:
config and token files hold its SHA-256 hex digest (:class:`~rock_serve.config.TokenEntry`),
and :class:`TokenTable` hashes the presented token, then compares the digest with *every*
entry through :func:`hmac.compare_digest` (constant time, no early exit), so neither the
timing nor the order of entries tells which one matched.

Policy (:class:`Authenticator`): with auth ``required``, a missing or unknown token is
:class:`~rock_serve.errors.Unauthorized` (401); with auth ``disabled`` (no tokens configured)
every caller is :data:`ANONYMOUS`, an admin in namespace ``default``, exactly as before auth
existed, so such a platform must stay on loopback.

The SDK and CLI find their token in ``ROCK_TOKEN`` or, failing that, in the credentials file
(``ROCK_CREDENTIALS``, default ``~/.rock/credentials``, mode 0600) that ``rock up`` writes:
JSON ``{"tokens": {"<base url>": "<token>"}}``, so a token only ever goes to the platform it
was made for.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rock_serve._extras import require
from rock_serve.config import AuthConfig, TokenEntry
from rock_serve.errors import InvalidConfig, Unauthorized

__all__ = [
    "ANONYMOUS",
    "CREDENTIALS_ENV",
    "TOKEN_PREFIX",
    "Authenticator",
    "Principal",
    "TokenTable",
    "bearer_token",
    "credentials_path",
    "generate_token",
    "hash_token",
    "load_token_file",
    "read_credentials",
    "save_token_file",
    "write_credentials",
]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "rk_"
#: Environment variable naming the credentials file.
CREDENTIALS_ENV = "ROCK_CREDENTIALS"
#: Seconds between checks of the token file for changes (rotation, revocation).
_RELOAD_SECONDS = 2.0
_ENTRIES: TypeAdapter[list[TokenEntry]] = TypeAdapter(list[TokenEntry])


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and namespace, or the anonymous caller."""

    name: str
    namespace: str
    admin: bool = False

    def may_see(self, namespace: str) -> bool:
        """True when this caller may act on a sandbox of ``namespace``."""
        return self.admin or namespace == self.namespace


#: The caller when auth is disabled: an admin in namespace ``default``.
ANONYMOUS = Principal(name="anonymous", namespace="default", admin=True)


def generate_token() -> str:
    """A new random bearer token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The lower-case hex SHA-256 of a token's UTF-8 bytes, as stored in config."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    """The accepted tokens, by digest; verification compares against every entry."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        """Build the table.

        Raises:
            InvalidConfig: two entries share a name or a digest.
        """
        self.entries: tuple[TokenEntry, ...] = tuple(entries)
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise InvalidConfig(f"duplicate token names: {', '.join(dupes)}")
        if len({e.sha256 for e in self.entries}) != len(self.entries):
            raise InvalidConfig("two token entries have the same sha256 (the same token)")
        self._digests = [(bytes.fromhex(e.sha256), e) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def verify(self, token: str) -> Principal | None:
        """The principal of ``token``, or None; constant time in which entry matches."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: TokenEntry | None = None
        for expected, entry in self._digests:
            # Every entry is compared; `match` is computed before it is looked at.
            match = hmac.compare_digest(digest, expected)
            found = entry if match else found
        if found is None:
            return None
        return Principal(name=found.name, namespace=found.namespace, admin=found.admin)


def load_token_file(path: str | Path) -> list[TokenEntry]:
    """Entries of a YAML/JSON token file: a list of entries or ``{"tokens": [...]}``.

    Raises:
        InvalidConfig: the file is missing, unreadable or does not parse.
    """
    yaml = require("yaml", "cli", "reading a token file")
    file = Path(path).expanduser()
    try:
        data: Any = yaml.safe_load(file.read_text()) or []
    except OSError as exc:
        raise InvalidConfig(
            f"token file {str(file)!r} cannot be read ({exc.strerror}); create it with "
            "`rock up` or `rock token create --file`"
        ) from None
    except yaml.YAMLError as exc:
        raise InvalidConfig(f"token file {str(file)!r} is not YAML/JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("tokens", [])
    try:
        return _ENTRIES.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidConfig(f"bad token file {str(file)!r}: {problems}") from None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (parents made 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_token_file(path: str | Path, entries: Iterable[TokenEntry]) -> None:
    """Write a token file (``{"tokens": [...]}`` as YAML), atomically, mode 0600."""
    yaml = require("yaml", "cli", "writing a token file")
    data = {"tokens": [e.model_dump() for e in entries]}
    header = "# rock-serve token file: SHA-256 digests only, never tokens (rock token hash).\n"
    _write_private(Path(path).expanduser(), header + yaml.safe_dump(data, sort_keys=False))


class Authenticator:
    """Turns a request's credential into a :class:`Principal` (one per Admin replica).

    Tokens come from ``auth.tokens`` and ``auth.token_file``; the file is re-read when its
    modification time changes (checked at most every two seconds), so rotating or revoking
    a token needs no redeploy. A file that turns bad keeps the last good table (and logs).
    """

    def __init__(self, config: AuthConfig, clock: Any = time.monotonic) -> None:
        """Load the tokens.

        Raises:
            InvalidConfig: the token file is missing or bad, or entries clash.
        """
        self.config = config
        self.required = config.required
        self._clock = clock
        self._file = Path(config.token_file).expanduser() if config.token_file else None
        self._mtime: float | None = None
        self._checked = clock()
        self.table = TokenTable(config.tokens)
        if self.required and self._file is not None:
            self._mtime = self._stat()
            self.table = TokenTable([*config.tokens, *load_token_file(self._file)])
        if self.required and not self.table.entries:
            log.warning("auth: required, but no token is configured yet: every call gets 401")

    def _stat(self) -> float | None:
        try:
            return self._file.stat().st_mtime_ns if self._file else None
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        now = self._clock()
        if self._file is None or now - self._checked < _RELOAD_SECONDS:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        try:
            self.table = TokenTable([*self.config.tokens, *load_token_file(self._file)])
            self._mtime = mtime
            log.info("auth: reloaded %d token(s) from %s", len(self.table), self._file)
        except InvalidConfig as exc:
            log.error("auth: keeping the previous tokens: %s", exc)

    def authenticate(self, token: str | None) -> Principal:
        """The caller behind ``token`` (the bearer credential, or None when absent).

        Raises:
            Unauthorized: auth is required and the token is missing or unknown.
        """
        if not self.required:
            return ANONYMOUS
        if not token:
            raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        self._maybe_reload()
        principal = self.table.verify(token)
        if principal is None:
            raise Unauthorized("the bearer token is not valid")
        return principal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# ------------------------------------------------------------------------------- credentials


def credentials_path(environ: Mapping[str, str] | None = None) -> Path:
    """The SDK's credentials file: ``ROCK_CREDENTIALS``, else ``~/.rock/credentials``."""
    env = os.environ if environ is None else environ
    value = env.get(CREDENTIALS_ENV)
    return Path(value).expanduser() if value else Path.home() / ".rock" / "credentials"


def _key(base_url: str) -> str:
    return base_url.strip().rstrip("/")


def read_credentials(path: str | Path, base_url: str) -> str | None:
    """The token saved for ``base_url`` in a credentials file, or None (also if unreadable)."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError):
        return None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    token = tokens.get(_key(base_url)) if isinstance(tokens, dict) else None
    return token if isinstance(token, str) and token else None


def write_credentials(path: str | Path, base_url: str, token: str) -> None:
    """Save ``token`` for ``base_url`` in a credentials file (mode 0600), keeping the others."""
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), dict):
        data = {"tokens": {}}
    data["tokens"][_key(base_url)] = token
    _write_private(file, json.dumps(data, indent=2) + "\n")
