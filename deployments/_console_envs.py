"""The console's envs and trajectories feeds (issue 17): read-only, namespace-scoped, paged.

- ``GET /ui/api/envs/{id}/episodes?offset=&limit=`` -> :class:`EpisodeList`: an env
  instance's kept episodes, newest first (closed instances stay readable for a while: the env
  table keeps the last ones it closed).
- ``GET /ui/api/envs/{id}/episodes/{index}?offset=&limit=`` -> :class:`EpisodeStepPage`: one
  episode's steps (reset first), previews of observations, actions and infos.
- ``GET /ui/api/sandboxes/{id}/trajectory?offset=&limit=`` -> :class:`TrajectoryPage`: the
  LLM calls the sandbox's model service recorded (request and response side by side). A live
  sandbox answers from its Worker; once it is gone, callers who see every namespace read the
  stored trajectory (``llm.trajectory_dir`` JSONL or S3, under the sandbox id).

Every route takes the caller (``Auth``): a viewer may read, a tenant sees only its namespace
(another namespace's instance or sandbox is a 404). Pages are bounded by ``limit``'s maximum.
Wiring: :func:`rock_serve.deployments._console.install` includes :data:`router`.
"""

# No "from __future__ import annotations": FastAPI must see the real types of the routes.

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from rock_serve.deployments._auth import Auth
from rock_serve.deployments._ray import call
from rock_serve.errors import NotFound, SandboxNotFound
from rock_serve.protocol.llm import Trajectory, TrajectoryStep
from rock_serve.protocol.trajectories import EpisodeList, EpisodeStepPage, TrajectoryPage
from rock_serve.runtime._sync import run_sync

__all__ = ["MAX_EPISODES_PAGE", "MAX_STEPS_PAGE", "MAX_TRAJECTORY_PAGE", "router"]

#: Most items one page of each feed may ask for.
MAX_EPISODES_PAGE = 100
MAX_STEPS_PAGE = 200
MAX_TRAJECTORY_PAGE = 100

router = APIRouter(prefix="/ui/api", include_in_schema=False)

InstanceId = Annotated[str, Path(min_length=1, max_length=128, description="Instance id.")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="First item of the page.")]


def _admin() -> Any:
    from ray import serve  # lazily: only the replica has a replica context

    return serve.get_replica_context().servable_object


def _enabled() -> None:
    if not _admin().args.console.enabled:
        raise NotFound("the web console is disabled (console.enabled: false)")


@router.get("/envs/{instance_id}/episodes", response_model=EpisodeList)
async def ui_env_episodes(
    instance_id: InstanceId,
    principal: Auth,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_EPISODES_PAGE)] = 20,
) -> EpisodeList:
    """A page of an env instance's episodes, newest first (404: unknown or not the caller's)."""
    _enabled()
    from rock_serve.deployments import _gem

    table = await _gem.env_table()
    result: EpisodeList = await call(
        table, _gem.EnvTable.episodes, principal, instance_id, offset, limit
    )
    return result


@router.get("/envs/{instance_id}/episodes/{index}", response_model=EpisodeStepPage)
async def ui_env_episode(
    instance_id: InstanceId,
    index: Annotated[int, Path(ge=0, le=1_000_000_000)],
    principal: Auth,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_STEPS_PAGE)] = 100,
) -> EpisodeStepPage:
    """A page of one episode's steps, the reset first (404: unknown instance or episode)."""
    _enabled()
    from rock_serve.deployments import _gem

    table = await _gem.env_table()
    result: EpisodeStepPage = await call(
        table, _gem.EnvTable.episode_steps, principal, instance_id, index, offset, limit
    )
    return result


def _page(
    trajectory: Trajectory, sandbox_id: str, live: bool, offset: int, limit: int
) -> TrajectoryPage:
    steps: list[TrajectoryStep] = trajectory.steps
    return TrajectoryPage(
        trajectory_id=trajectory.trajectory_id,
        sandbox_id=sandbox_id,
        live=live,
        total=len(steps),
        offset=offset,
        items=steps[offset : offset + limit],
    )


@router.get("/sandboxes/{sandbox_id}/trajectory", response_model=TrajectoryPage)
async def ui_trajectory(
    sandbox_id: Annotated[str, Path(min_length=1, max_length=128)],
    principal: Auth,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_TRAJECTORY_PAGE)] = 50,
) -> TrajectoryPage:
    """A page of the LLM calls a sandbox's model service recorded.

    Raises:
        NotFound: the sandbox has no model service, or is gone and no trajectory is stored
            under its id (or the caller may not see it).
    """
    _enabled()
    admin = _admin()
    from rock_serve.deployments._llm import LLMWorker

    try:
        trajectory: Trajectory = await admin._data(sandbox_id, LLMWorker.llm_trajectory)
    except SandboxNotFound:
        if not principal.all_namespaces:
            raise  # a gone sandbox's namespace is unknown: only platform-wide callers read it
        from rock_serve.deployments._llm import load_trajectory

        steps = await run_sync(load_trajectory, admin.args.llm, sandbox_id)
        trajectory = Trajectory(trajectory_id=sandbox_id, sandbox_id=sandbox_id, steps=steps)
        return _page(trajectory, sandbox_id, False, offset, limit)
    return _page(trajectory, sandbox_id, True, offset, limit)
