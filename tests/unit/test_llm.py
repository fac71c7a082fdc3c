"""Model-service wire models and who may ask for reverse ports (no Ray, no sandbox)."""

import pytest
from pydantic import ValidationError

from rock_serve.auth import Principal
from rock_serve.deployments._auth import check_spec_privileges
from rock_serve.errors import PermissionDenied, ReplayDiverged, error_class, http_status
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.protocol.api import LIFECYCLE_FIELDS
from rock_serve.protocol.llm import LLMAnswer, ModelServiceSpec


def test_mode_fields_are_checked():
    assert ModelServiceSpec().mode == "relay"
    with pytest.raises(ValidationError, match="base_url"):
        ModelServiceSpec(mode="proxy")
    with pytest.raises(ValidationError, match="replay"):
        ModelServiceSpec(mode="replay")
    with pytest.raises(ValidationError):
        ModelServiceSpec(mode="relay", timeout=0)
    with pytest.raises(ValidationError):
        CreateSandboxRequest(reverse_ports=[{"port": 80, "target": "no-port"}])


def test_the_proxy_key_stays_out_of_repr_and_the_runtime_spec():
    spec = ModelServiceSpec(mode="proxy", base_url="http://m/v1", api_key="sk-secret")
    assert "sk-secret" not in repr(spec)
    assert {"model_service", "reverse_ports"} <= LIFECYCLE_FIELDS


def test_an_answer_is_a_response_or_an_error():
    assert LLMAnswer(error="no").error == "no"
    with pytest.raises(ValidationError):
        LLMAnswer()
    with pytest.raises(ValidationError):
        LLMAnswer(response={}, error="both")


def test_reverse_ports_need_an_admin():
    req = CreateSandboxRequest(reverse_ports=[{"port": 9000, "target": "127.0.0.1:80"}])
    check_spec_privileges(Principal("root", "default", admin=True), req)
    with pytest.raises(PermissionDenied, match="reverse_ports"):
        check_spec_privileges(Principal("t", "default"), req)
    check_spec_privileges(Principal("t", "default"), CreateSandboxRequest(model_service={}))


def test_a_proxying_model_service_needs_an_admin():
    # The node sends the proxied requests: a tenant must not aim it at what the node reaches.
    spec = {"mode": "proxy", "base_url": "http://169.254.169.254/latest", "api_key": "k"}
    req = CreateSandboxRequest(model_service=spec)
    check_spec_privileges(Principal("root", "default", admin=True), req)
    with pytest.raises(PermissionDenied, match="proxy"):
        check_spec_privileges(Principal("t", "default"), req)


def test_error_codes_in_the_table():
    assert error_class("replay_diverged") is ReplayDiverged
    assert http_status("replay_diverged") == 409
    assert http_status("llm_timeout") == 504
