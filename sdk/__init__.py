"""rock_serve.sdk: Python clients of the rock-serve REST v1 API.

:class:`Client` and :class:`AsyncClient` have the same methods (``close``/``aclose`` aside) on
one sans-IO core; :class:`Sandbox`/:class:`AsyncSandbox` bind a client to one sandbox and
delete it when their ``with`` block ends. Errors are the classes of :mod:`rock_serve.errors`.

Example::

    from rock_serve.sdk import Client

    with Client() as client, client.sandbox(image="python:3.12", ttl_seconds=600) as sb:
        print(sb.run("python3 --version").output)
"""

from rock_serve.sdk._async import AsyncClient
from rock_serve.sdk._async_llm import AsyncLLMCallHandle, AsyncSandboxLLM
from rock_serve.sdk._async_process import AsyncProcess, AsyncProcessOutput, AsyncSandboxProcesses
from rock_serve.sdk._async_sandbox import AsyncSandbox, AsyncSandboxFiles
from rock_serve.sdk._base import ClientSettings, RetryPolicy
from rock_serve.sdk._llm_relay import AsyncLLMRelay, LLMRelay
from rock_serve.sdk._sync import Client
from rock_serve.sdk._sync_llm import LLMCallHandle, SandboxLLM
from rock_serve.sdk._sync_process import Process, ProcessOutput, SandboxProcesses
from rock_serve.sdk._sync_sandbox import Sandbox, SandboxFiles

__all__ = [
    "AsyncClient",
    "AsyncLLMCallHandle",
    "AsyncLLMRelay",
    "AsyncProcess",
    "AsyncProcessOutput",
    "AsyncSandbox",
    "AsyncSandboxFiles",
    "AsyncSandboxLLM",
    "AsyncSandboxProcesses",
    "Client",
    "ClientSettings",
    "LLMCallHandle",
    "LLMRelay",
    "Process",
    "ProcessOutput",
    "RetryPolicy",
    "Sandbox",
    "SandboxFiles",
    "SandboxLLM",
    "SandboxProcesses",
]
