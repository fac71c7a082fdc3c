"""GEM tools that run the agent's code in a rock-serve sandbox instead of on the trainer host.

GEM (``gem-llm``, axon-rl/gem) wraps an env with ``ToolEnvWrapper(env, tools=[...])``; on each
``step(action)`` it asks every tool ``execute_action(action) -> (is_valid, has_error,
observation, parsed_action)`` and, when a tool parses the action, returns the tool's observation
instead of stepping the env. :class:`GemPythonTool` mirrors GEM's ``PythonCodeTool`` (the first
``<python>...</python>`` or fenced python block; the observation ``"Code execution result: ..."``)
and :class:`GemBashTool` does the same for ``<bash>...</bash>`` or fenced bash/sh blocks. GEM's
own tool runs the code as a subprocess of the trainer (``sandbox_type="none"`` by default); these
run it as a fresh process in one sandbox per tool, created on first use and deleted by
:meth:`GemSandboxTool.close` (its TTL is the backstop). Files persist between calls.

The classes have GEM's ``BaseTool`` shape (``tool_type``, ``name``, ``instruction_string()``,
``execute_action()``) without importing GEM. They are synchronous, like GEM's env loop, and use
the SDK's sync :class:`~rock_serve.sdk.Client` (one pooled HTTP client per tool).
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from types import TracebackType
from typing import ClassVar

import httpx

from rock_serve.errors import (
    RockError,
    RockletUnavailable,
    SandboxFailed,
    SandboxNotFound,
    SandboxNotRunning,
)
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.sdk import Client

__all__ = ["GemBashTool", "GemPythonTool", "GemSandboxTool"]

log = logging.getLogger("rock_serve.envs.integrations")

_GONE = (SandboxNotFound, SandboxNotRunning, SandboxFailed, RockletUnavailable)


class GemSandboxTool:
    """Base of the GEM tools: parse a code block out of the action, run it in the sandbox."""

    #: GEM's tool type tag (recorded in ``info["tool_type"]`` by ``ToolEnvWrapper``).
    tool_type: ClassVar[str] = "sandbox"
    #: Block patterns tried in order; the block that ends first wins.
    patterns: ClassVar[tuple[str, ...]] = ()
    #: Interpreter argv and file suffix of the code.
    interpreter: ClassVar[tuple[str, ...]] = ()
    suffix: ClassVar[str] = ""

    def __init__(
        self,
        *,
        client: Client | None = None,
        base_url: str | None = None,
        token: str | None = None,
        image: str | None = None,
        timeout: float = 5.0,
        ttl_seconds: float = 3600.0,
        keep_error_last_line: bool = False,
        owner: str = "gem",
        num_workers: int = 1,
    ) -> None:
        """Configure the tool (no sandbox until the first code block).

        Args:
            client: An SDK client to share; None to make one from ``base_url``/``token``
                (default ``ROCK_BASE_URL``/``ROCK_TOKEN``), closed with the tool.
            base_url: Platform URL.
            token: Bearer token.
            image: Sandbox image (None: the runtime's default).
            timeout: Seconds each run may take (GEM's default is 5).
            ttl_seconds: Hard deadline of the sandbox on the platform.
            keep_error_last_line: Keep only the last line of stderr (as GEM's option does).
            owner: Owner recorded on the sandbox.
            num_workers: Accepted for GEM's ``BaseTool`` signature; unused.
        """
        self.num_workers = num_workers
        self.timeout = timeout
        self.ttl_seconds = ttl_seconds
        self.keep_error_last_line = keep_error_last_line
        self.image = image
        self.owner = owner
        self.name = type(self).__name__
        self._own_client = client is None
        self.client = client if client is not None else Client(base_url, token=token)
        self.sandbox_id: str | None = None

    def __enter__(self) -> GemSandboxTool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def instruction_string(self) -> str:
        """How the agent should call the tool (appended to the first observation by GEM)."""
        raise NotImplementedError

    def _parse_action(self, action: str) -> tuple[str | None, str, bool]:
        """The first complete code block, the action up to its end, and whether one was found."""
        code: str | None = None
        parsed_action = action
        end = len(action) + 1
        for pattern in self.patterns:
            match = re.search(pattern, action, re.DOTALL)
            if match and match.end() < end:
                code, parsed_action, end = (
                    match.group(1).strip(),
                    action[: match.end()],
                    match.end(),
                )
        return code, parsed_action, code is not None

    def execute_action(self, action: str) -> tuple[bool, bool, str, str]:
        """Run the action's first code block in the sandbox.

        Returns:
            ``(is_valid, has_error, observation, parsed_action)`` as GEM's tools do:
            ``is_valid`` is whether a code block was found, ``has_error`` whether it failed
            (non-zero exit, timeout, or a platform error), ``observation`` is
            ``"Code execution result: "`` then stdout, stderr on the next line if any, and a
            final newline.
        """
        code, parsed_action, is_valid = self._parse_action(action)
        if not is_valid or code is None:
            return False, True, "", action
        try:
            success, stdout, stderr = self._run(code)
        except RockError as exc:
            success, stdout, stderr = False, "", f"sandbox error: {exc.code.value}: {exc.message}"
        if stderr and self.keep_error_last_line:
            stderr = stderr.strip().split("\n")[-1]
        result = f"{stdout}\n{stderr}" if stderr else stdout
        observation = "Code execution result: " + result.lstrip(" \n") + "\n"
        return True, not success, observation, parsed_action

    def _sandbox(self) -> str:
        if self.sandbox_id is None:
            token = uuid.uuid4().hex
            request = CreateSandboxRequest(
                client_token=token,
                image=self.image,
                owner=self.owner,
                ttl_seconds=self.ttl_seconds,
                labels={"rock-serve/integration": "gem", "rock-serve/tool": self.tool_type},
            )
            try:
                record = self.client.create_sandbox(request)
            except BaseException:
                # The answer may be lost while the create goes on (an interrupt): undo it.
                with contextlib.suppress(RockError, httpx.HTTPError):
                    self.client.delete_by_token(token)
                raise
            self.sandbox_id = record.id
        return self.sandbox_id

    def _run(self, code: str) -> tuple[bool, str, str]:
        sandbox_id = self._sandbox()
        script = f".gem/{uuid.uuid4().hex[:12]}{self.suffix}"
        try:
            self.client.write_file(sandbox_id, script, code.encode("utf-8"))
            result = self.client.exec(sandbox_id, [*self.interpreter, script], timeout=self.timeout)
        except _GONE:
            self.sandbox_id = None  # the next call gets a new sandbox
            raise
        stdout = result.stdout_bytes().decode("utf-8", errors="replace")
        stderr = result.stderr_bytes().decode("utf-8", errors="replace").strip()  # as GEM does
        if result.timed_out:
            stderr = (stderr + "\n" if stderr else "") + (
                f"Execution timed out after {self.timeout:g} seconds."  # GEM's words
            )
        return result.exit_code == 0 and not result.timed_out, stdout, stderr

    def close(self) -> None:
        """Delete the sandbox (and close the client if the tool made it)."""
        sandbox_id, self.sandbox_id = self.sandbox_id, None
        try:
            if sandbox_id is not None:
                try:
                    self.client.delete_sandbox(sandbox_id)
                except SandboxNotFound:
                    pass
                except RockError:
                    log.warning("could not delete sandbox %s (its TTL will)", sandbox_id)
        finally:
            if self._own_client:
                self.client.close()


class GemPythonTool(GemSandboxTool):
    """GEM's ``PythonCodeTool``, running the code in a sandbox (``python3``)."""

    tool_type = "python_code"
    patterns = (r"<python>(.*?)</python>", r"```\n?python(.*?)```")
    interpreter = ("python3",)
    suffix = ".py"

    def instruction_string(self) -> str:
        """GEM's instruction for its Python tool."""
        return (
            "Solve the above problem step by step. You now have the ability to selectively "
            "write executable Python code to enhance your reasoning process. The Python code "
            'will be executed by an external sandbox, and the output (after "Code execution '
            'result: ") is returned to aid your reasoning and help you arrive at the final '
            "answer. The Python code should be complete scripts, including necessary imports, "
            "wrapped within <python>...</python> tags or using ```python...``` code block. "
            "Return your final answer within \\boxed{}."
        )


class GemBashTool(GemSandboxTool):
    """A GEM tool for bash scripts (``<bash>...</bash>`` or a fenced bash/sh block)."""

    tool_type = "bash"
    patterns = (r"<bash>(.*?)</bash>", r"```\n?(?:bash|sh)\n(.*?)```")
    interpreter = ("bash",)
    suffix = ".sh"

    def instruction_string(self) -> str:
        """How to call the bash tool."""
        return (
            "You can run bash commands in a Linux sandbox: put a script within <bash>...</bash> "
            'tags or a ```bash...``` code block. Its output (after "Code execution result: ") '
            "is returned to you. Files you write persist between scripts."
        )
