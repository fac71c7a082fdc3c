"""Data-plane tokens: signed by the control plane, checked on the node without a round trip."""

from __future__ import annotations

import pytest

from rock_serve import dataplane_token as dt
from rock_serve.errors import PermissionDenied, Unauthorized

SECRET = b"s" * 32
SID = "sb-abc123-01hzzzzzzzzzzzzzzzzzzzzzzz"


def _token(**kw: object) -> str:
    args: dict[str, object] = {"namespace": "team-a", "token_name": "alice", "ttl": 60.0}
    args.update(kw)
    token, _ = dt.sign(SECRET, SID, **args)  # type: ignore[arg-type]
    return token


def test_a_signed_token_verifies_with_its_claims():
    token, expires = dt.sign(
        SECRET, SID, namespace="team-a", token_name="alice", admin=True, ttl=60, now=1000.0
    )
    claims = dt.verify(SECRET, token, SID, now=1010.0)
    assert claims.sandbox_id == SID
    assert (claims.namespace, claims.token_name, claims.admin) == ("team-a", "alice", True)
    assert claims.expires_at == expires == 1060.0
    assert claims.kid == dt.key_id(SECRET) == dt.peek_kid(token)
    assert SECRET.hex() not in token and "s" * 8 not in token


@pytest.mark.parametrize("token", [None, "", "Bearer x", "rdp1.a.b.c", "rdp2.e30.xyz"])
def test_missing_or_malformed_tokens_are_unauthorized(token):
    with pytest.raises(Unauthorized):
        dt.verify(SECRET, token, SID)


def test_a_forged_token_is_unauthorized():
    prefix, payload, signature = _token().split(".")
    # Another sandbox's id in the payload, the old signature: the MAC no longer matches.
    other, _ = dt.sign(SECRET, "sb-abc123-other", namespace="team-a", token_name="a", ttl=60)
    with pytest.raises(Unauthorized, match="signature"):
        dt.verify(SECRET, f"{prefix}.{other.split('.')[1]}.{signature}", "sb-abc123-other")
    # The right shape signed with another secret.
    wrong, _ = dt.sign(b"x" * 32, SID, namespace="team-a", token_name="alice", ttl=60)
    with pytest.raises(Unauthorized, match="signature"):
        dt.verify(SECRET, wrong, SID)
    # A flipped signature character.
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    with pytest.raises(Unauthorized):
        dt.verify(SECRET, f"{prefix}.{payload}.{flipped}", SID)


def test_an_expired_token_is_unauthorized_past_the_leeway():
    token, expires = dt.sign(SECRET, SID, namespace="n", token_name="t", ttl=10, now=1000.0)
    dt.verify(SECRET, token, SID, now=expires + dt.LEEWAY - 0.1)
    with pytest.raises(Unauthorized, match="expired"):
        dt.verify(SECRET, token, SID, now=expires + dt.LEEWAY + 0.1)


def test_a_token_of_another_sandbox_is_forbidden():
    with pytest.raises(PermissionDenied):
        dt.verify(SECRET, _token(), "sb-abc123-someoneelse")
    assert PermissionDenied.status == 403 and Unauthorized.status == 401


def test_verified_tokens_check_expiry_and_sandbox_on_every_call():
    cache = dt.VerifiedTokens()
    token, expires = dt.sign(SECRET, SID, namespace="n", token_name="t", ttl=10, now=1000.0)
    assert cache.verify(SECRET, token, SID, now=1001.0) == dt.verify(SECRET, token, SID, now=1001.0)
    assert cache.kid(token) == dt.key_id(SECRET)
    # The second call is a hit: still refused for another sandbox, and once expired.
    with pytest.raises(PermissionDenied):
        cache.verify(SECRET, token, "sb-abc123-other", now=1001.0)
    with pytest.raises(Unauthorized, match="expired"):
        cache.verify(SECRET, token, SID, now=expires + dt.LEEWAY + 0.1)


def test_verified_tokens_recheck_the_signature_when_the_secret_changes():
    cache = dt.VerifiedTokens()
    token = _token()
    cache.verify(SECRET, token, SID)
    with pytest.raises(Unauthorized, match="signature"):
        cache.verify(b"x" * 32, token, SID)  # the cached claims were checked with SECRET only
    cache.verify(SECRET, token, SID)


def test_verified_tokens_never_keep_a_forged_token_and_stay_bounded():
    cache = dt.VerifiedTokens(size=2)
    prefix, payload, signature = _token().split(".")
    forged = f"{prefix}.{payload}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}"
    for _ in range(2):  # refused the second time too: nothing was cached
        with pytest.raises(Unauthorized):
            cache.verify(SECRET, forged, SID)
    with pytest.raises(Unauthorized):
        cache.verify(SECRET, None, SID)
    tokens = [_token(token_name=f"t{i}") for i in range(3)]
    for token in tokens:
        cache.verify(SECRET, token, SID)
    assert len(cache._items) == 2 and tokens[0] not in cache._items
