"""Wire models of the console's envs and trajectories view (``/ui/api/envs/...``, issue 17).

An env instance (a GEM instance of the env table) keeps its last episodes: each a list of
steps (action, reward, terminated/truncated, a preview of the observation and info). The
instance's sandbox may also have a model service whose recorded LLM calls (its trajectory) the
console shows beside the steps. Every list is paged (``offset``/``limit``, with ``total``) and
every preview is cut to a bounded length, so no reply grows with an episode's size.
"""

from __future__ import annotations

from pydantic import Field

from rock_serve.protocol._base import WireModel
from rock_serve.protocol.llm import TrajectoryStep

__all__ = [
    "EpisodeList",
    "EpisodeStep",
    "EpisodeStepPage",
    "EpisodeSummary",
    "TrajectoryPage",
]


class EpisodeStep(WireModel):
    """One step of an episode (index 0 is the reset: no action, no reward)."""

    index: int = Field(ge=0, description="0 for the reset, then 1, 2, ... per step.")
    at: float = Field(description="When it ended, seconds since the epoch.")
    action: str | None = Field(
        default=None, description="The action as JSON text (cut to a preview); None at reset."
    )
    observation: str = Field(description="The observation as JSON text (cut to a preview).")
    reward: float | None = Field(default=None, description="The step's reward; None at reset.")
    terminated: bool = Field(default=False, description="The episode ended in a terminal state.")
    truncated: bool = Field(default=False, description="The episode was cut (time limit).")
    info: str = Field(default="{}", description="The info dict as JSON text (cut to a preview).")


class EpisodeSummary(WireModel):
    """One episode of an env instance, without its steps."""

    index: int = Field(ge=0, description="The instance's episode number (0 = its first reset).")
    started: float = Field(description="When its reset ended, seconds since the epoch.")
    steps: int = Field(ge=0, description="Steps taken after the reset.")
    total_reward: float = Field(description="Sum of the steps' rewards.")
    done: bool = Field(description="True once a step terminated or truncated it.")
    dropped_steps: int = Field(
        default=0, ge=0, description="Steps not kept (past the per-episode bound)."
    )
    sandbox_id: str | None = Field(default=None, description="The sandbox it ran in.")


class EpisodeList(WireModel):
    """Reply of ``GET /ui/api/envs/{id}/episodes``: newest first."""

    instance_id: str = Field(description="The env instance.")
    env_id: str = Field(description="Its registered env id.")
    total: int = Field(ge=0, description="Episodes kept for it.")
    offset: int = Field(ge=0, description="Index of the first item in this page.")
    items: list[EpisodeSummary] = Field(description="This page, newest first.")


class EpisodeStepPage(WireModel):
    """Reply of ``GET /ui/api/envs/{id}/episodes/{index}``: a page of one episode's steps."""

    instance_id: str = Field(description="The env instance.")
    episode: EpisodeSummary = Field(description="The episode.")
    total: int = Field(ge=0, description="Steps kept, the reset included.")
    offset: int = Field(ge=0, description="Index of the first item in this page.")
    items: list[EpisodeStep] = Field(description="This page, oldest first.")


class TrajectoryPage(WireModel):
    """Reply of ``GET /ui/api/sandboxes/{id}/trajectory``: a page of recorded LLM calls."""

    trajectory_id: str = Field(description="The id it is stored under.")
    sandbox_id: str = Field(description="The sandbox that made it.")
    live: bool = Field(description="True while the sandbox lives; False when read from storage.")
    total: int = Field(ge=0, description="Calls recorded.")
    offset: int = Field(ge=0, description="Index of the first item in this page.")
    items: list[TrajectoryStep] = Field(description="This page, oldest first.")
