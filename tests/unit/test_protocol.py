import pydantic
import pytest

from rock_serve import protocol
from rock_serve.protocol import ExecRequest, ExecResult, SessionRunRequest, WireModel


def _models():
    return [
        obj
        for name in protocol.__all__
        if isinstance(obj := getattr(protocol, name), type)
        and issubclass(obj, WireModel)
        and obj is not WireModel
    ]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_field_is_described(model):
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"


def test_unknown_fields_are_refused():
    with pytest.raises(pydantic.ValidationError):
        ExecRequest.model_validate({"command": "ls", "bogus": 1})


def test_limits_are_validated():
    with pytest.raises(pydantic.ValidationError):
        SessionRunRequest(command="ls", timeout=-1)
    with pytest.raises(pydantic.ValidationError):
        SessionRunRequest(session="../x", command="ls")
    with pytest.raises(pydantic.ValidationError):
        ExecRequest(command=[])


def test_binary_output_round_trips_as_base64():
    (out, err), encoding = protocol.encode_bytes(b"\xff\xfe", b"ok")
    assert encoding == "base64"
    result = ExecResult(exit_code=0, stdout=out, stderr=err, encoding=encoding, duration=0.1)
    again = ExecResult.model_validate_json(result.model_dump_json())
    assert again.stdout_bytes() == b"\xff\xfe"
    assert again.stderr_bytes() == b"ok"
