"""Wire models of the model service and the reverse tunnel (issue 15.2 reverse, 15.3).

A sandbox created with ``model_service`` gets an OpenAI-compatible endpoint at
``OPENAI_BASE_URL=http://127.0.0.1:<port>/v1`` inside it (a reverse tunnel to its node) and a
dummy per-sandbox ``OPENAI_API_KEY``. What answers depends on ``mode``:

- ``relay``: each request waits for the trainer (:class:`LLMCall` out, :class:`LLMAnswer` in);
- ``proxy``: forwarded to ``base_url`` with ``api_key``, which stays on the node;
- ``replay``: answered from a recorded trajectory; a request that differs is ``replay_diverged``.

Every request/response pair is one :class:`TrajectoryStep` of the sandbox's trajectory.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from rock_serve.protocol._base import WireModel

__all__ = [
    "LLMAnswer",
    "LLMCall",
    "LLMCallList",
    "LLMPollRequest",
    "LLMRelease",
    "MAX_POLL_CALLS",
    "MAX_POLL_WAIT",
    "ModelServiceSpec",
    "ReversePort",
    "Trajectory",
    "TrajectoryStep",
]

#: The sandbox-side port of the model service unless ``model_service.port`` says otherwise.
DEFAULT_LLM_PORT = 8765
#: The longest one long poll for relayed calls may wait (seconds), and the most calls it takes.
MAX_POLL_WAIT = 60.0
MAX_POLL_CALLS = 4096


class ReversePort(WireModel):
    """A port inside the sandbox whose connections reach ``target`` on the sandbox's node."""

    port: int = Field(ge=1, le=65535, description="Port on 127.0.0.1 inside the sandbox.")
    target: str = Field(
        min_length=3,
        max_length=300,
        pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$",
        description="host:port the node connects each connection to (seen from the node).",
    )


class TrajectoryStep(WireModel):
    """One model call: the chat.completions request and what answered it."""

    request: dict[str, Any] = Field(description="The chat.completions request body.")
    response: dict[str, Any] | None = Field(
        default=None, description="The chat.completion object returned (None if it failed)."
    )
    error: dict[str, Any] | None = Field(
        default=None, description="The OpenAI-style error the agent got instead, if any."
    )


class ModelServiceSpec(WireModel):
    """The create field ``model_service``."""

    mode: Literal["relay", "proxy", "replay"] = Field(
        default="relay",
        description="relay: the trainer answers each call; proxy: forward to base_url; "
        "replay: answer from a recorded trajectory.",
    )
    port: int = Field(
        default=DEFAULT_LLM_PORT, ge=1, le=65535, description="Port inside the sandbox."
    )
    timeout: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description="Seconds a call may wait for its answer; then the agent gets a 504 "
        "llm_timeout error.",
    )
    base_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="proxy: the OpenAI-compatible base URL (ending in /v1) to forward to.",
    )
    api_key: str | None = Field(
        default=None,
        max_length=4096,
        repr=False,
        description="proxy: the key sent to base_url; held on the node, never in the sandbox.",
    )
    model: str | None = Field(
        default=None, max_length=256, description="proxy: replace the request's model name."
    )
    replay: list[TrajectoryStep] | None = Field(
        default=None, description="replay: the recorded steps to answer from."
    )
    replay_trajectory_id: str | None = Field(
        default=None,
        max_length=256,
        description="replay: load the steps of this stored trajectory instead.",
    )

    @model_validator(mode="after")
    def _check_mode(self) -> ModelServiceSpec:
        if self.mode == "proxy" and not self.base_url:
            raise ValueError("model_service mode 'proxy' needs base_url")
        if self.mode == "replay" and self.replay is None and not self.replay_trajectory_id:
            raise ValueError("model_service mode 'replay' needs replay or replay_trajectory_id")
        return self


class LLMCall(WireModel):
    """A relayed model call waiting for the trainer's answer."""

    call_id: str = Field(description="Id to answer with (names the sandbox).")
    sandbox_id: str = Field(description="The sandbox whose agent asked.")
    step: int = Field(description="Index of this call in the sandbox's trajectory.")
    request: dict[str, Any] = Field(description="The chat.completions request body.")


class LLMCallList(WireModel):
    """Calls handed to one poll."""

    calls: list[LLMCall] = Field(default_factory=list, description="The calls, oldest first.")


class LLMPollRequest(WireModel):
    """Wait for relayed calls of several sandboxes at once (one trainer connection)."""

    sandbox_ids: list[str] = Field(min_length=1, max_length=4096, description="Sandboxes.")
    wait: float = Field(
        default=20.0, ge=0, le=MAX_POLL_WAIT, description="Seconds to wait for a call."
    )
    max_calls: int = Field(
        default=256, ge=1, le=MAX_POLL_CALLS, description="At most this many calls."
    )


class LLMRelease(WireModel):
    """Polled calls the taker will not answer: back to the queue for the next poll."""

    call_ids: list[str] = Field(min_length=1, max_length=4096, description="Their ids.")


class LLMAnswer(WireModel):
    """The trainer's answer to one call: a chat.completion object, or an error message."""

    # "Exactly one of" in the schema too, so a schema-valid body is never refused.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["response"], "properties": {"response": {"type": "object"}}},
                {"required": ["error"], "properties": {"error": {"type": "string"}}},
            ]
        }
    )

    response: dict[str, Any] | None = Field(
        default=None, description="The chat.completion object (choices, usage, ...)."
    )
    error: str | None = Field(
        default=None, max_length=65536, description="Fail the call with this message."
    )

    @model_validator(mode="after")
    def _one(self) -> LLMAnswer:
        if (self.response is None) == (self.error is None):
            raise ValueError("give exactly one of response and error")
        return self


class Trajectory(WireModel):
    """A sandbox's recorded model calls."""

    trajectory_id: str = Field(description="The id it is stored under.")
    sandbox_id: str | None = Field(default=None, description="The sandbox that made it.")
    steps: list[TrajectoryStep] = Field(default_factory=list, description="Calls in order.")
