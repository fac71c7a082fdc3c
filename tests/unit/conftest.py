"""Unit tests run without Ray: any attempt to start it is a bug in the test."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    ray = sys.modules.get("ray")
    if ray is not None:

        def refuse(*args, **kwargs):
            raise RuntimeError("unit tests must not start Ray")

        monkeypatch.setattr(ray, "init", refuse)
