import pytest

from rock_serve import errors
from rock_serve.errors import ErrorCode, RockError


def test_table_covers_every_code():
    for code in ErrorCode:
        cls = errors.error_class(code)
        assert cls.code is code
        assert 400 <= cls.status < 600


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.SandboxNotFound, LookupError),
        (errors.SessionNotFound, LookupError),
        (errors.FileNotFound, FileNotFoundError),
        (errors.InvalidRequest, ValueError),
        (errors.PathOutsideSandbox, PermissionError),
        (errors.Timeout, TimeoutError),
        (errors.RockletUnavailable, ConnectionError),
        (errors.Unauthorized, PermissionError),
    ],
)
def test_exceptions_inherit_the_builtin_they_mean(cls, builtin):
    assert issubclass(cls, RockError)
    assert issubclass(cls, builtin)


def test_round_trip_through_the_body():
    exc = errors.RateLimited("slow down", retry_after=2.5)
    body = errors.to_body(exc)
    assert body == {"error": {"code": "rate_limited", "message": "slow down", "retry_after": 2.5}}
    again = errors.from_body(body)
    assert type(again) is errors.RateLimited
    assert again.retry_after == 2.5
    assert errors.http_status("rate_limited") == 429


def test_foreign_exceptions_leak_nothing():
    body = errors.to_body(KeyError("/secret/path"))
    assert body == {"error": {"code": "internal", "message": "internal error"}}


def test_unknown_or_malformed_bodies_become_typed_errors():
    assert type(errors.from_body({"error": {"code": "nope", "message": "x"}})) is (
        errors.InternalError
    )
    exc = errors.from_body("<html>bad gateway</html>", status=404)
    assert isinstance(exc, errors.NotFound)
    assert "HTTP 404" in str(exc)
