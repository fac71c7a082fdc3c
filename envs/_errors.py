"""Typed errors of the env layer: subclasses of :mod:`rock_serve.errors`, so no new codes.

Each one travels as its parent's code (``not_found``, ``invalid_request``, ``conflict``) when a
route renders it, and each still inherits the builtin it means. The two episode-order errors
also inherit Gymnasium's ``ResetNeeded``, so code written against Gymnasium catches them.
"""

from __future__ import annotations

from gymnasium.error import ResetNeeded as _GymResetNeeded

from rock_serve.errors import Conflict, InvalidRequest, NotFound

__all__ = [
    "EnvClosed",
    "EnvExists",
    "EnvNotFound",
    "EpisodeOver",
    "InvalidAction",
    "InvalidEnvKwargs",
    "ResetNeeded",
]


class EnvNotFound(NotFound):
    """No env is registered under that id; ``details['suggestions']`` lists close ids."""


class EnvExists(Conflict):
    """An env is already registered under that id (pass ``replace=True`` to replace it)."""


class InvalidEnvKwargs(InvalidRequest):
    """``make`` got keyword arguments the env does not take; ``details['valid']`` lists those
    it does take and ``details['unexpected']`` the others.
    """


class InvalidAction(InvalidRequest):
    """The action is not in the env's action space; the episode goes on as if it was not sent."""


class ResetNeeded(Conflict, _GymResetNeeded):
    """``step`` before the first ``reset``, or after a step that failed: call ``reset``."""


class EpisodeOver(ResetNeeded):
    """``step`` after the episode terminated or was truncated: call ``reset``."""


class EnvClosed(Conflict):
    """The env was closed; make a new one."""
