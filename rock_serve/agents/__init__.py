"""Real agent packages in sandboxes, their LLM calls answered by the trainer (issue 15.4).

``run_agent(sandbox, policy, task="fix_add")`` runs mini-swe-agent (image ``agent-mini``,
built by ``scripts/build-agent-images``) on a task in a sandbox; each LLM call the agent makes
is answered by ``policy``; the task's verifier gives the reward. ``start_agent`` gives the
calls one by one instead (``async for call in run.calls(): await call.respond(...)``), and the
``rock/AgentTask-v0`` env makes each call one env step.
"""

from rock_serve.agents._policy import (
    SUBMIT,
    HTTPPolicy,
    ScriptedPolicy,
    action_message,
    solution_replies,
)
from rock_serve.agents._protocol import AGENTS, completion
from rock_serve.agents._run import (
    AgentOutcome,
    AgentRun,
    LLMCall,
    Policy,
    llm_calls,
    run_agent,
    start_agent,
)
from rock_serve.agents._tasks import BUILTIN_TASKS, AgentTask, builtin_task

__all__ = [
    "AGENTS",
    "AGENT_IMAGE",
    "BUILTIN_TASKS",
    "SUBMIT",
    "AgentOutcome",
    "AgentRun",
    "AgentTask",
    "HTTPPolicy",
    "LLMCall",
    "Policy",
    "ScriptedPolicy",
    "action_message",
    "builtin_task",
    "completion",
    "llm_calls",
    "run_agent",
    "solution_replies",
    "start_agent",
]

#: The image with mini-swe-agent (scripts/build-agent-images).
AGENT_IMAGE = "oci:/var/cache/rock-serve/images:agent-mini"
