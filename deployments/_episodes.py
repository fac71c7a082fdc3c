"""What the env table keeps of each instance's episodes, for the console (issue 17).

:class:`EpisodeLog` is one instance's record: its last :data:`MAX_EPISODES` episodes, each
with at most :data:`MAX_STEPS` steps (later steps are counted, not kept), every observation,
action and info cut to :data:`PREVIEW_CHARS` characters of JSON. The memory one instance holds
is bounded whatever its episodes do. The env table records into it on each reset and step;
the console reads it in pages (:meth:`EpisodeLog.page`, :meth:`EpisodeLog.steps`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rock_serve.errors import NotFound
from rock_serve.protocol.trajectories import EpisodeStep, EpisodeSummary

__all__ = ["MAX_EPISODES", "MAX_STEPS", "PREVIEW_CHARS", "EpisodeLog", "preview"]

#: Episodes kept per instance (the oldest go first).
MAX_EPISODES = 20
#: Steps kept per episode (the reset included); later ones are only counted.
MAX_STEPS = 500
#: Characters of JSON kept of each observation, action and info.
PREVIEW_CHARS = 2000


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """``value`` (plain JSON data) as JSON text of at most ``limit`` characters (cut with …)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Episode:
    index: int
    started: float
    sandbox_id: str | None
    steps: list[EpisodeStep] = field(default_factory=list)
    taken: int = 0
    total_reward: float = 0.0
    done: bool = False

    def summary(self) -> EpisodeSummary:
        return EpisodeSummary(
            index=self.index,
            started=self.started,
            steps=self.taken,
            total_reward=self.total_reward,
            done=self.done,
            dropped_steps=self.taken + 1 - len(self.steps),
            sandbox_id=self.sandbox_id,
        )


class EpisodeLog:
    """One env instance's last episodes (see the module docstring)."""

    def __init__(
        self,
        *,
        max_episodes: int = MAX_EPISODES,
        max_steps: int = MAX_STEPS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_steps = max_steps
        self._clock = clock
        self._episodes: deque[_Episode] = deque(maxlen=max_episodes)
        self._next = 0

    def __len__(self) -> int:
        return len(self._episodes)

    def reset(self, observation: Any, info: Any, sandbox_id: str | None) -> None:
        """A reset ended: start a new episode."""
        now = self._clock()
        episode = _Episode(index=self._next, started=now, sandbox_id=sandbox_id)
        episode.steps.append(
            EpisodeStep(index=0, at=now, observation=preview(observation), info=preview(info))
        )
        self._episodes.append(episode)
        self._next += 1

    def step(
        self,
        action: Any,
        observation: Any,
        reward: float,
        terminated: bool,
        truncated: bool,
        info: Any,
    ) -> None:
        """A step ended (ignored when no episode was started: the env refused it anyway)."""
        if not self._episodes:
            return
        episode = self._episodes[-1]
        episode.taken += 1
        episode.total_reward += reward
        episode.done = episode.done or terminated or truncated
        if len(episode.steps) >= self.max_steps:
            return
        episode.steps.append(
            EpisodeStep(
                index=episode.taken,
                at=self._clock(),
                action=preview(action),
                observation=preview(observation),
                reward=reward,
                terminated=terminated,
                truncated=truncated,
                info=preview(info),
            )
        )

    def page(self, offset: int, limit: int) -> tuple[int, list[EpisodeSummary]]:
        """(how many are kept, the summaries from ``offset``, newest first)."""
        newest = list(reversed(self._episodes))
        return len(newest), [e.summary() for e in newest[offset : offset + limit]]

    def steps(
        self, index: int, offset: int, limit: int
    ) -> tuple[EpisodeSummary, int, list[EpisodeStep]]:
        """(the episode, how many steps are kept, the steps from ``offset``).

        Raises:
            NotFound: episode ``index`` was never recorded or is no longer kept.
        """
        for episode in self._episodes:
            if episode.index == index:
                return episode.summary(), len(episode.steps), episode.steps[offset : offset + limit]
        raise NotFound(f"no episode {index} (never recorded, or older than the last kept)")
