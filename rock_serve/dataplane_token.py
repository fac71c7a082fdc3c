"""Data-plane tokens: short-lived, scoped to one sandbox, signed by the control plane.

The Admin signs a token after it checked the caller may use the sandbox; the node's data-plane
server verifies it without a round trip (HMAC-SHA256 with the cluster secret, constant-time).

Format: ``rdp1.<payload>.<signature>``, both parts unpadded base64url; the payload is compact
JSON ``{"sb": sandbox id, "ns": namespace, "tn": token name, "adm": admin, "exp": unix time,
"kid": key id}``. ``kid`` names the secret (the first hex digits of its SHA-256), so a node whose
secret changed knows to fetch the new one rather than to trust or refuse blindly.

Standard library only (the node side needs nothing else).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from rock_serve.errors import PermissionDenied, Unauthorized

__all__ = ["PREFIX", "TokenClaims", "VerifiedTokens", "key_id", "sign", "verify"]

PREFIX = "rdp1"
#: Seconds of clock skew between the signing Admin and the verifying node that are tolerated.
LEEWAY = 5.0


@dataclass(frozen=True)
class TokenClaims:
    """What a data-plane token grants: one sandbox, until ``expires_at``."""

    sandbox_id: str
    namespace: str
    token_name: str
    admin: bool
    expires_at: float
    kid: str


def key_id(secret: bytes) -> str:
    """A short public name of ``secret`` (not enough to recover it)."""
    return hashlib.sha256(b"rock-dataplane-kid:" + secret).hexdigest()[:12]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, f"{PREFIX}.{payload}".encode("ascii"), hashlib.sha256).digest())


def sign(
    secret: bytes,
    sandbox_id: str,
    *,
    namespace: str,
    token_name: str,
    admin: bool = False,
    ttl: float,
    now: float | None = None,
) -> tuple[str, float]:
    """A token for ``sandbox_id`` valid for ``ttl`` seconds.

    Returns:
        The token and its expiry (unix seconds).
    """
    expires = (time.time() if now is None else now) + ttl
    claims = {
        "sb": sandbox_id,
        "ns": namespace,
        "tn": token_name,
        "adm": admin,
        "exp": round(expires, 3),
        "kid": key_id(secret),
    }
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    return f"{PREFIX}.{payload}.{_mac(secret, payload)}", expires


def peek_kid(token: str) -> str | None:
    """The key id a token claims (unverified: only to pick the secret to verify it with)."""
    try:
        _, payload, _ = token.split(".")
        kid = json.loads(_unb64(payload)).get("kid")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return kid if isinstance(kid, str) else None


def verify(
    secret: bytes, token: str | None, sandbox_id: str, *, now: float | None = None
) -> TokenClaims:
    """Check ``token`` for a call on ``sandbox_id``.

    Raises:
        Unauthorized: no token, a malformed or forged one, or an expired one (401).
        PermissionDenied: a valid token for another sandbox (403).
    """
    return _check_use(_signed_claims(secret, token), sandbox_id, now)


def _signed_claims(secret: bytes, token: str | None) -> TokenClaims:
    """The claims of ``token`` once its signature is checked (not its expiry or sandbox)."""
    if not token:
        raise Unauthorized("the data plane needs a sandbox token (Authorization: Bearer ...)")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise Unauthorized("malformed data-plane token")
    _, payload, signature = parts
    if not hmac.compare_digest(_mac(secret, payload), signature):
        raise Unauthorized("invalid data-plane token signature")
    try:
        raw = json.loads(_unb64(payload))
        claims = TokenClaims(
            sandbox_id=str(raw["sb"]),
            namespace=str(raw["ns"]),
            token_name=str(raw["tn"]),
            admin=bool(raw["adm"]),
            expires_at=float(raw["exp"]),
            kid=str(raw["kid"]),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise Unauthorized("malformed data-plane token") from exc
    return claims


def _check_use(claims: TokenClaims, sandbox_id: str, now: float | None) -> TokenClaims:
    if claims.expires_at + LEEWAY < (time.time() if now is None else now):
        raise Unauthorized("the data-plane token has expired")
    if claims.sandbox_id != sandbox_id:
        raise PermissionDenied("the data-plane token is for another sandbox")
    return claims


class VerifiedTokens:
    """:func:`verify` with the signature check done once per token and secret.

    A client sends the same token on every call to a sandbox, so the data-plane server keeps
    the claims of the last ``size`` tokens whose signature it checked (LRU), with the secret
    they were checked against: a hit skips the HMAC and the JSON parse (most of a direct
    call's token check), a changed secret is a miss. Expiry and sandbox are checked on every
    call, as :func:`verify` does. A forged or malformed token is never kept.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[bytes, TokenClaims]] = OrderedDict()

    def kid(self, token: str) -> str | None:
        """The key id ``token`` names (:func:`peek_kid`, from the cache when it is known)."""
        hit = self._items.get(token)
        return hit[1].kid if hit is not None else peek_kid(token)

    def verify(
        self, secret: bytes, token: str | None, sandbox_id: str, *, now: float | None = None
    ) -> TokenClaims:
        """As :func:`verify`.

        Raises:
            Unauthorized: no token, a malformed or forged one, or an expired one (401).
            PermissionDenied: a valid token for another sandbox (403).
        """
        if not token:
            return verify(secret, token, sandbox_id, now=now)  # raises
        hit = self._items.get(token)
        if hit is not None and hmac.compare_digest(hit[0], secret):
            self._items.move_to_end(token)
            return _check_use(hit[1], sandbox_id, now)
        claims = _signed_claims(secret, token)
        self._items[token] = (secret, claims)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return _check_use(claims, sandbox_id, now)
