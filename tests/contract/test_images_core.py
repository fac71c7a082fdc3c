"""The contract suite's core cases (sessions, exec, files, tar, stats) on OCI images.

- ``bwrap-nopython``: an image with no Python at all (busybox-static + bash-static); the
  rocklet runs on the node's interpreter, bundled read-only with its libraries.
- ``bwrap-registry``: the Debian base pulled from a real registry (docker-registry on
  loopback, htpasswd auth) with per-create credentials.
- ``docker-registry``: the docker runtime on the same image from the same registry.
"""

from __future__ import annotations

import os

import pytest

from rock_serve.config import BwrapRuntimeConfig, ImageStoreConfig
from rock_serve.protocol import RegistryAuth, SandboxSpec
from tests._registry import Registry, oci, registry_skip_reason
from tests.contract import test_rocklet_ops as ops
from tests.contract.conftest import (
    _BWRAP_SKIP,
    REQUIRE_DOCKER,
    TEST_CGROUP_PARENT,
    docker_config,
    require_docker,
)

_SKIP = _BWRAP_SKIP or registry_skip_reason()
if _SKIP is not None and REQUIRE_DOCKER and _BWRAP_SKIP is None:
    raise RuntimeError(f"ROCK_REQUIRE_DOCKER=1 but the image tests cannot run: {_SKIP}")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))

AUTH = ("tester", "pw-" + os.urandom(4).hex())

_CORE = [
    "test_state_persists_between_commands",
    "test_exit_code_and_dollar_question_survive",
    "test_multiline_heredoc_and_syntax_error",
    "test_output_without_trailing_newline_and_binary",
    "test_timeout_interrupts_the_command_not_the_session",
    "test_busy_shell_loop_restarts_the_session",
    "test_output_cap_sets_truncated_and_keeps_the_head",
    "test_streaming_arrives_as_it_is_produced",
    "test_stdin_reaches_the_running_command",
    "test_interrupt_stops_the_running_command",
    "test_second_command_in_a_busy_session_is_refused",
    "test_sessions_run_in_parallel",
    "test_session_lifecycle_errors",
    "test_exit_ends_the_session",
    "test_startup_commands_run_once",
    "test_exec_keeps_stdout_and_stderr_apart",
    "test_exec_timeout_kills_the_process_group",
    "test_exec_caps_and_missing_program",
    "test_exec_streaming",
    "test_write_read_stat_list_remove",
    "test_large_binary_file_round_trip",
    "test_file_errors_are_typed",
    "test_tar_round_trip_of_a_directory",
    "test_tar_upload_refuses_escaping_members",
    "test_stats_report_the_sandbox_view",
    "test_a_cancelled_run_leaves_the_next_output_clean",
    "test_output_larger_than_a_frame_arrives_whole",
]
h = ops.h
sh = ops.sh
for _name in _CORE:
    globals()[_name] = getattr(ops, _name)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry"), auth=AUTH).start()
    try:
        reg.push(oci("bookworm"), "test/base:v1")
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture(
    params=[
        pytest.param("bwrap-nopython", marks=pytest.mark.bwrap),
        pytest.param("bwrap-registry", marks=pytest.mark.bwrap),
        pytest.param("docker-registry", marks=pytest.mark.docker),
    ]
)
def image_case(request):
    return request.param


@pytest.fixture
def runtime_config(image_case, tmp_path, store_root):
    state = str(tmp_path / "state")
    if image_case.startswith("docker"):
        require_docker()
        return docker_config(state, pull="if-missing")
    return BwrapRuntimeConfig(
        state_dir=state, cgroup_parent=TEST_CGROUP_PARENT, images=ImageStoreConfig(root=store_root)
    )


@pytest.fixture
def sandbox_spec(image_case, request):
    if image_case == "bwrap-nopython":
        return SandboxSpec(image=oci("nopython"), owner="contract-tests")
    reg = request.getfixturevalue("registry")
    return SandboxSpec(
        image=reg.ref("test/base:v1"),
        registry_auth=RegistryAuth(username=AUTH[0], password=AUTH[1]),
        owner="contract-tests",
    )
