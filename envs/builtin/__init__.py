"""The built-in envs, registered under the ``rock/`` namespace when ``rock_serve.envs`` loads.

- ``rock/Terminal-v0``: shell tasks (fix a failing test, fix a config value, count log lines,
  find a token) scored by a verifier run in the sandbox; 30 steps.
- ``rock/CodeExec-v0``: a programming problem answered with Python code, scored by hidden tests
  run in the sandbox; one attempt by default.
- ``rock/AgentTask-v0``: mini-swe-agent works on a task in the sandbox; each step answers one
  of its LLM calls; the verifier's verdict when it exits is the reward.
- ``rock/GuessNumber-v0``: a number-guessing game whose state lives in the sandbox; small and
  fast, for smoke tests; 10 steps.
"""

from rock_serve.envs._registry import register
from rock_serve.envs.builtin.agent_task import AgentTaskEnv
from rock_serve.envs.builtin.code_exec import CodeExec
from rock_serve.envs.builtin.guess_number import GuessNumber
from rock_serve.envs.builtin.terminal import Terminal

__all__ = ["AgentTaskEnv", "CodeExec", "GuessNumber", "Terminal"]

register(
    id="rock/Terminal-v0",
    entry_point="rock_serve.envs.builtin.terminal:Terminal",
    max_episode_steps=30,
    description="Shell tasks in a sandbox (fix a failing test, fix a config value, count log "
    "lines, find a token); bash commands as actions; a verifier in the sandbox gives the reward "
    "on `submit` or at the time limit.",
)
register(
    id="rock/CodeExec-v0",
    entry_point="rock_serve.envs.builtin.code_exec:CodeExec",
    description="A seeded programming problem; the action is Python code defining solve(), "
    "run against hidden tests in the sandbox.",
)
register(
    id="rock/GuessNumber-v0",
    entry_point="rock_serve.envs.builtin.guess_number:GuessNumber",
    max_episode_steps=10,
    description="Guess a number between 1 and 100 (higher/lower answers); the game's state is "
    "kept in the sandbox. Small and fast, for smoke tests.",
)
register(
    id="rock/AgentTask-v0",
    entry_point="rock_serve.envs.builtin.agent_task:AgentTaskEnv",
    max_episode_steps=30,
    description="mini-swe-agent (image agent-mini) works on a task in the sandbox; each step "
    "answers one of its LLM calls (observation: the pending request's messages as JSON; action: "
    "the assistant message); the verifier's verdict when the agent exits is the reward.",
)
