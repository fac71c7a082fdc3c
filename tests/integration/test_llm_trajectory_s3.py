"""Trajectory storage of the model service: JSONL files and S3 (moto's real server on loopback)."""

from __future__ import annotations

import json
import uuid

import pytest

from rock_serve.config import LLMConfig
from rock_serve.deployments._llm import (
    _write_trajectory,
    assemble_chunks,
    completion_chunks,
    load_trajectory,
)
from rock_serve.errors import NotFound
from rock_serve.protocol.llm import TrajectoryStep
from tests._s3 import use_test_credentials

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

STEPS = [
    TrajectoryStep(
        request={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        response={"id": "c", "choices": [{"index": 0, "message": {"content": "yo"}}]},
    ),
    TrajectoryStep(request={"messages": []}, error={"code": "llm_timeout"}),
]


@pytest.fixture(autouse=True)
def _credentials(monkeypatch):
    use_test_credentials(monkeypatch)


def _lines(steps: list[TrajectoryStep]) -> bytes:
    return b"".join(s.model_dump_json().encode() + b"\n" for s in steps)


@pytest.mark.s3
def test_written_to_s3_and_loaded_back_tagged(s3_endpoint, tmp_path):
    bucket = f"traj-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    config = LLMConfig(
        trajectory_dir=str(tmp_path / "local"), s3_bucket=bucket, s3_endpoint=s3_endpoint
    )
    _write_trajectory(config, "episode/7", _lines(STEPS))
    obj = s3.get_object(Bucket=bucket, Key="trajectories/episode_7.jsonl")
    assert obj["Metadata"]["trajectory-id"] == "episode/7"
    rows = [json.loads(line) for line in obj["Body"].read().splitlines()]
    assert rows[0]["response"]["choices"][0]["message"]["content"] == "yo"
    (tmp_path / "local" / "episode_7.jsonl").unlink()  # S3 alone must be enough
    assert load_trajectory(config, "episode/7") == STEPS


def test_local_directory_and_missing(tmp_path):
    config = LLMConfig(trajectory_dir=str(tmp_path))
    _write_trajectory(config, "t1", _lines(STEPS))
    assert load_trajectory(config, "t1") == STEPS
    assert (tmp_path / "t1.jsonl").read_bytes() == _lines(STEPS)
    with pytest.raises(NotFound):
        load_trajectory(config, "../t1-missing")


def test_sse_chunks_round_trip_with_tool_calls():
    completion = {
        "id": "c1",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "thinking",
                    "tool_calls": [
                        {
                            "id": "t",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"total_tokens": 3},
    }
    back = assemble_chunks(completion_chunks(completion))
    assert back["choices"] == completion["choices"]
    assert back["usage"] == completion["usage"]
    assert back["object"] == "chat.completion"
