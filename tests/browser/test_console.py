"""The web console driven in headless Chromium: log in, watch, drive, and be refused."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.e2e._head import wait_for

from .conftest import ConsoleApp, login, shot

pytestmark = pytest.mark.usefixtures("cleanup")


def _create(app: ConsoleApp, user: str, **spec: Any) -> str:
    with app.sdk(user) as client:
        return client.create_sandbox(ttl_seconds=600, **spec).id


def _row(page: Any, sandbox_id: str) -> Any:
    return page.locator(f'#rows tr[data-id="{sandbox_id}"]')


def test_login_then_a_sandbox_made_by_the_sdk_appears(page, console_app):
    login(page, console_app, "alice")
    page.wait_for_selector("body[data-table-ready='1']")
    assert page.locator("#who").inner_text() == "alice · tenant · team-a"
    sandbox_id = _create(console_app, "alice", owner="sdk-user", labels={"task": "t1"})
    row = _row(page, sandbox_id)
    row.wait_for()  # no reload: it came over the live feed
    page.wait_for_function(
        "id => document.querySelector(`#rows tr[data-id='${id}'] td:nth-child(2)`)"
        ".textContent.startsWith('running')",
        arg=sandbox_id,
    )
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == sandbox_id
    assert cells[2:4] == ["team-a", "sdk-user"]
    # Filters and search narrow the table without a reload.
    page.get_by_label("Search").fill("task=t1")
    assert _row(page, sandbox_id).is_visible()
    page.get_by_label("Search").fill("no-such-thing")
    page.wait_for_function("() => document.querySelectorAll('#rows tr').length === 0")
    page.get_by_label("Search").fill("")
    page.get_by_label("State").select_option("failed")
    page.wait_for_function("() => document.querySelectorAll('#rows tr').length === 0")
    page.get_by_label("State").select_option("running")
    _row(page, sandbox_id).wait_for()
    shot(page, "sandboxes-table")
    # A delete shows up live too.
    with console_app.sdk("alice") as client:
        client.delete_sandbox(sandbox_id)
    _row(page, sandbox_id).wait_for(state="detached")


def test_the_terminal_runs_a_command(page, console_app):
    sandbox_id = _create(console_app, "alice")
    login(page, console_app, "alice")
    page.goto(f"{console_app.ui}#/sandbox/{sandbox_id}")
    page.get_by_role("button", name="Open terminal").click()
    page.wait_for_selector("#terminal[data-connected='1']")
    page.keyboard.type("echo $((6 * 7))-from-browser\n")
    page.wait_for_function(
        "() => document.querySelector('#terminal .xterm-rows')"
        ".textContent.includes('42-from-browser')"
    )
    shot(page, "terminal")


def test_upload_then_download_a_file(page, console_app, tmp_path: Path):
    sandbox_id = _create(console_app, "alice")
    with console_app.client("alice") as api:
        work = (
            api.post(
                f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "mkdir -p up && cd up && pwd"}
            )
            .json()["stdout"]
            .strip()
        )
    login(page, console_app, "alice")
    page.goto(f"{console_app.ui}#/sandbox/{sandbox_id}")
    page.get_by_label("Directory").fill(work)
    source = tmp_path / "notes.txt"
    source.write_bytes(b"hello from the browser\n\x00\xff binary tail")
    page.get_by_label("File to upload").set_input_files(str(source))
    page.get_by_role("button", name="Upload", exact=True).click()
    page.wait_for_selector("#files-status:has-text('uploaded')")
    link = page.get_by_role("link", name="notes.txt")
    link.wait_for()
    with console_app.client("alice") as api:
        stored = api.get(f"/v1/sandboxes/{sandbox_id}/files", params={"path": f"{work}/notes.txt"})
    assert stored.content == source.read_bytes()
    with page.expect_download() as info:
        link.click()
    target = tmp_path / "downloaded.txt"
    info.value.save_as(target)
    assert target.read_bytes() == source.read_bytes()
    shot(page, "files")


def _line(page: Any, caption: str, series: str) -> Any:
    figure = page.locator("#charts figure", has=page.locator(f"figcaption:text-is('{caption}')"))
    return figure.locator(f"polyline[data-series='{series}']")


def test_metric_charts_render(page, console_app):
    login(page, console_app, "root")  # the console starts sampling: then the actions count
    page.goto(f"{console_app.ui}#/metrics")
    sandbox_id = _create(console_app, "root")
    with console_app.client("root") as api:  # one of each thing the charts count
        assert api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "true"}).is_success
        assert api.get("/v1/sandboxes/sb-nosuch-0000000000000000").status_code == 404
        started = api.post(f"/v1/sandboxes/{sandbox_id}/processes", json={"command": "sleep 600"})
        assert started.status_code == 201, started.text
    # Samples come once a second here; wait for at least two and a drawn line.
    page.wait_for_function("() => Number(document.querySelector('#charts')?.dataset.samples) >= 2")
    # A flat line has no height (Playwright calls it hidden): attached is what counts.
    page.wait_for_selector("svg.chart polyline[data-series='running']", state="attached")
    # Every chart the issue names draws its line (reaps: test_reaps_by_reason_and_paused_charts).
    for caption, series in [
        ("Sandboxes by state", "running"),
        ("Create latency (s)", "p50"),
        ("Op latency (s)", "p50"),
        ("Errors by status", "404"),
        ("Processes running", "processes"),
    ]:
        _line(page, caption, series).wait_for(state="attached")
    label = page.locator("svg.chart").first.get_attribute("aria-label")
    assert label is not None and re.search(r"running \d", label)
    # The page reloads its samples every 5 s: wait for one taken after the process started.
    page.wait_for_function(
        "() => /processes [1-9]/.test(document.querySelector("
        "\"svg.chart[aria-label^='Processes running']\")?.getAttribute('aria-label') || '')"
    )
    shot(page, "metrics")


def test_keyboard_navigation_and_labels(page, console_app):
    page.goto(console_app.ui)
    # The login form is reachable and usable with the keyboard only.
    page.wait_for_selector("#token:focus")  # the form takes the focus when it shows
    page.keyboard.press("Shift+Tab")  # before it: only the skip link
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type(console_app.tokens["alice"])
    page.keyboard.press("Enter")
    page.wait_for_selector("body[data-table-ready='1']")
    sandbox_id = _create(console_app, "alice")
    _row(page, sandbox_id).wait_for()
    # Every form control has a label; every table header is a column header.
    unlabeled = page.evaluate(
        """[...document.querySelectorAll('input, select, button')]
             .filter(e => !e.closest('[hidden]'))
             .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                          && !e.textContent.trim())
             .map(e => e.outerHTML)"""
    )
    assert unlabeled == []
    assert page.locator("th[scope='col']").count() == 10
    # Tab from the nav reaches the row's link; Enter opens its page.
    page.get_by_role("link", name="Sandboxes").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == sandbox_id:
            break
    else:
        pytest.fail("the row's link is not reachable with Tab")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"h1:has-text('Sandbox {sandbox_id}')")
    assert page.get_by_role("button", name="Renew lease").is_visible()


def test_a_tenant_sees_only_its_namespace(page, console_app):
    mine = _create(console_app, "alice")
    theirs = _create(console_app, "bob")
    login(page, console_app, "alice")
    _row(page, mine).wait_for()
    ids = page.locator("#rows tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert mine in ids
    assert theirs not in ids
    assert set(page.locator("#rows tr td:nth-child(3)").all_inner_texts()) == {"team-a"}
    # Bob's sandbox page is a 404 for alice, like an unknown id.
    page.goto(f"{console_app.ui}#/sandbox/{theirs}")
    page.wait_for_selector("#toast:has-text('sandbox_not_found')")
    shot(page, "tenant-isolation")


def test_a_viewer_sees_everything_and_may_do_nothing(page, console_app):
    sandbox_id = _create(console_app, "alice")
    login(page, console_app, "vera")
    _row(page, sandbox_id).wait_for()  # a viewer sees every namespace
    page.goto(f"{console_app.ui}#/sandbox/{sandbox_id}")
    page.wait_for_selector("#h-summary")
    assert page.get_by_role("button", name="Renew lease").count() == 0
    assert page.get_by_role("button", name="Delete").count() == 0
    assert page.get_by_role("button", name="Open terminal").count() == 0
    assert page.get_by_label("File to upload").count() == 0
    shot(page, "viewer")
    # The API refuses the viewer's actions with 403, with the cookie (and the CSRF header)...
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "rock_csrf")
    resp = page.request.post(
        f"{console_app.url}/v1/sandboxes/{sandbox_id}/renew", headers={"X-CSRF-Token": csrf}
    )
    assert resp.status == 403
    assert resp.json()["error"]["code"] == "permission_denied"
    # ... and with its bearer token.
    with console_app.client("vera") as vera:
        assert vera.get(f"/v1/sandboxes/{sandbox_id}").status_code == 200
        assert vera.get(f"/v1/sandboxes/{sandbox_id}/stats").status_code == 200
        for method, path, body in [
            ("DELETE", f"/v1/sandboxes/{sandbox_id}", None),
            ("POST", f"/v1/sandboxes/{sandbox_id}/exec", {"command": "true"}),
            ("POST", "/v1/sandboxes", {}),
        ]:
            resp = vera.request(method, path, json=body)
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "permission_denied"
    ws_url = console_app.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty"
    with connect(
        ws_url, additional_headers={"Authorization": f"Bearer {console_app.tokens['vera']}"}
    ) as ws:
        assert json.loads(ws.recv(timeout=20))["error"]["code"] == "permission_denied"
    with console_app.client("alice") as alice:
        assert alice.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "running"


def test_an_operator_manages_every_namespace(console_app):
    sandbox_id = _create(console_app, "alice")
    with console_app.client("otto") as otto:
        listed = otto.get("/v1/sandboxes").json()["items"]
        assert sandbox_id in [item["id"] for item in listed]
        ran = otto.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "echo op"})
        assert ran.json()["stdout"] == "op\n"
        assert otto.get("/v1/health").json()["workers"] != []
        assert otto.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204


def test_the_cookie_is_httponly_strict_and_csrf_checked(page, console_app):
    sandbox_id = _create(console_app, "alice")
    login(page, console_app, "alice")
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["rock_session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert cookies["rock_csrf"]["httpOnly"] is False
    assert page.evaluate("document.cookie").find("rock_session") == -1  # scripts cannot read it
    jar = {"rock_session": session["value"], "rock_csrf": cookies["rock_csrf"]["value"]}
    with httpx.Client(base_url=console_app.url, cookies=jar, timeout=30) as browserish:
        renew = f"/v1/sandboxes/{sandbox_id}/renew"
        # A state-changing call with the cookie but without the CSRF header: refused.
        assert browserish.post(renew).status_code == 403
        wrong = browserish.post(renew, headers={"X-CSRF-Token": "guess"})
        assert wrong.status_code == 403
        # Another site's page: refused even with the header.
        cross = browserish.post(
            renew,
            headers={"X-CSRF-Token": jar["rock_csrf"], "Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        ok = browserish.post(renew, headers={"X-CSRF-Token": jar["rock_csrf"]})
        assert ok.status_code == 200, ok.text
        # Reads need no header.
        assert browserish.get(f"/v1/sandboxes/{sandbox_id}").status_code == 200
    # Log out: the cookie is gone and the login form is back.
    page.get_by_role("button", name="Log out").click()
    page.get_by_label("Token").wait_for()
    assert "rock_session" not in {c["name"] for c in page.context.cookies()}


def test_failed_calls_show_their_request_and_trace_ids(page, console_app):
    login(page, console_app, "alice")
    page.goto(f"{console_app.ui}#/sandbox/sb-000000000000-0000000000000000")
    toast = page.locator("#toast")
    toast.wait_for()
    text = toast.inner_text()
    assert "sandbox_not_found" in text
    assert re.search(r"request id [0-9a-f-]{32,36}", text)
    assert re.search(r"trace id [0-9a-f]{32}", text)
    with httpx.Client(base_url=console_app.url, timeout=30) as anon:
        resp = anon.get("/v1/sandboxes", headers={"X-Request-ID": "my-call-1"})
        assert resp.status_code == 401
        assert resp.headers["x-request-id"] == "my-call-1"
        parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        traced = anon.get("/v1/health", headers={"traceparent": parent})
        assert traced.headers["x-trace-id"] == "ab" * 16


def test_workers_and_envs_pages(page, console_app):
    gem = "/apis/v1/envs/gem"
    with console_app.client("alice") as alice:
        made = alice.post(f"{gem}/make", json={"env_id": "rock/GuessNumber-v0"})
        assert made.status_code == 200, made.text
        instance = made.json()["sandbox_id"]
    try:
        login(page, console_app, "root")
        page.get_by_role("link", name="Workers").click()
        page.wait_for_selector("#workers table")
        cells = page.locator("#workers tbody tr").first.locator("td").all_inner_texts()
        assert cells[2:4] == ["yes", "local"]
        assert int(cells[5]) == 32  # capacity, from max_sandboxes_per_node
        assert page.locator("#workers dd").nth(1).inner_text().isdigit()  # creates queued
        shot(page, "workers")
        page.get_by_role("link", name="Envs").click()
        page.wait_for_selector(f"#envs td:has-text('{instance}')")
        row = page.locator("#envs tbody tr", has_text=instance).locator("td").all_inner_texts()
        assert row[1:3] == ["rock/GuessNumber-v0", "team-a"]
        shot(page, "envs")
        # A tenant sees its own instance, and no node details.
        page.get_by_role("button", name="Log out").click()
        login(page, console_app, "bob")
        page.goto(f"{console_app.ui}#/envs")
        page.wait_for_selector("#envs p:has-text('No GEM env instances')")
        page.goto(f"{console_app.ui}#/workers")
        page.wait_for_selector("#workers p:has-text('Node details are shown')")
    finally:
        with console_app.client("alice") as alice:
            alice.post(f"{gem}/close", json={"sandbox_id": instance})


_AGENT = (
    "import json, os, urllib.request\n"
    "body = {'model': 'policy', 'messages': [{'role': 'user', 'content': 'pick a number'}]}\n"
    "req = urllib.request.Request(os.environ['OPENAI_BASE_URL'] + '/chat/completions',\n"
    "    data=json.dumps(body).encode(), headers={'Content-Type': 'application/json',\n"
    "    'Authorization': 'Bearer ' + os.environ['OPENAI_API_KEY']})\n"
    "reply = json.load(urllib.request.urlopen(req, timeout=60))\n"
    "print(reply['choices'][0]['message']['content'])\n"
)


def test_an_env_episode_beside_its_llm_calls(page, console_app):
    from rock_serve.sdk._sync_llm import LLMCallHandle, poll_calls

    gem = "/apis/v1/envs/gem"
    spec = {"model_service": {"mode": "relay", "port": _free_port()}}
    with console_app.client("alice") as alice, console_app.sdk("alice") as sdk:
        made = alice.post(
            f"{gem}/make", json={"env_id": "rock/GuessNumber-v0", "env_kwargs": {"sandbox": spec}}
        )
        assert made.status_code == 200, made.text
        instance = made.json()["sandbox_id"]
        assert alice.post(f"{gem}/reset", json={"sandbox_id": instance, "seed": 7}).is_success
        (row,) = [e for e in alice.get("/ui/api/envs").json()["items"] if e["id"] == instance]
        sandbox_id = row["sandbox_id"]
        # The policy's model call: the agent in the sandbox asks, the trainer answers (SDK).
        agent = sdk.start_process(sandbox_id, ["python3", "-c", _AGENT])
        (call,) = poll_calls(sdk, sandbox_id, 30, 1)
        LLMCallHandle(sdk, call).respond(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": "policy",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "I guess 50"},
                    }
                ],
            }
        )
        assert sdk.wait_process(sandbox_id, agent.pid, timeout=30).exit_code == 0
        for guess in ("50", "25"):
            step = alice.post(f"{gem}/step", json={"sandbox_id": instance, "action": guess})
            assert step.status_code == 200, step.text
        # Pages are bounded; a tenant of another namespace sees none of it.
        too_big = alice.get(f"/ui/api/envs/{instance}/episodes", params={"limit": 100_000})
        assert too_big.status_code in (400, 422) and "code" in too_big.json()["error"]
    with console_app.client("bob") as bob:
        assert bob.get(f"/ui/api/envs/{instance}/episodes").status_code == 404
        assert bob.get(f"/ui/api/sandboxes/{sandbox_id}/trajectory").status_code == 404
    try:
        login(page, console_app, "vera")  # a viewer may read
        page.goto(f"{console_app.ui}#/envs")
        link = page.get_by_role("link", name=instance)
        link.focus()  # keyboard: the instance is a link, Enter opens it
        page.keyboard.press("Enter")
        page.wait_for_selector("#steps[data-loaded='1']")
        page.wait_for_selector("#llm[data-loaded='1']")
        assert page.get_by_role("heading", name="Steps").is_visible()
        assert page.get_by_role("heading", name="LLM calls").is_visible()
        episodes = page.locator("#episode-list tbody tr")
        assert episodes.count() == 1
        assert episodes.first.locator("td").all_inner_texts()[:4] == ["Episode 0", "2", "0.0", "no"]
        steps = [r.locator("td").all_inner_texts() for r in page.locator("#step-rows tr").all()]
        assert [c[:3] for c in steps] == [
            ["reset", "–", "–"],
            ["1", '"50"', "0.0"],
            ["2", '"25"', "0.0"],
        ]
        assert "than 50" in steps[1][4]
        calls = page.locator("#llm-calls li")
        assert calls.count() == 1
        assert calls.first.locator(".llm-request").inner_text() == "pick a number"
        assert calls.first.locator(".llm-response").inner_text() == "I guess 50"
        shot(page, "env-episode-and-llm-calls")
    finally:
        with console_app.client("alice") as alice:
            alice.post(f"{gem}/close", json={"sandbox_id": instance})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_processes_follow_output_kill_and_open_a_port(page, console_app):
    sandbox_id = _create(console_app, "alice")
    port = _free_port()
    with console_app.client("alice") as api:
        base = f"/v1/sandboxes/{sandbox_id}/processes"
        talker = api.post(
            base, json={"command": "for i in 1 2 3; do echo line-$i; done; sleep 600"}
        ).json()["pid"]
        failing = api.post(base, json={"command": "echo bye; exit 3"}).json()["pid"]
        server = api.post(
            base,
            json={
                "command": f"mkdir -p www && echo served-by-sandbox > www/index.html && "
                f"exec python3 -m http.server {port} --bind 127.0.0.1 -d www"
            },
        ).json()["pid"]
        api.post(f"{base}/{failing}/wait", params={"timeout": 30})
    login(page, console_app, "alice")
    page.goto(f"{console_app.ui}#/sandbox/{sandbox_id}")
    rows = page.locator("#processes tr")
    page.wait_for_selector(f'#processes tr[data-pid="{server}"]')
    cells = page.locator(f'#processes tr[data-pid="{failing}"] td').all_inner_texts()
    assert cells[2:4] == ["exited", "3"]
    assert rows.count() == 3
    # Live output over the NDJSON stream.
    page.get_by_role("button", name=f"Output of {talker}").click()
    page.wait_for_function(
        "() => document.querySelector('#process-output').textContent.includes('line-3')"
    )
    assert page.locator("#process-output").inner_text().splitlines()[:3] == [
        "line-1",
        "line-2",
        "line-3",
    ]
    shot(page, "processes")
    # Kill ends the followed stream too, and the list shows the signal.
    page.get_by_role("button", name=f"Kill {talker}").click()
    page.wait_for_selector("#process-output[data-ended='1']")
    page.wait_for_function(
        "pid => document.querySelector(`#processes tr[data-pid='${pid}'] td:nth-child(3)`)"
        ".textContent.startsWith('killed')",
        arg=talker,
    )
    assert page.get_by_role("button", name=f"Kill {talker}").is_disabled()
    # "Open port" links to the port relay; the session cookie gets through it.
    page.get_by_label("Port in the sandbox").fill(str(port))
    link = page.locator("#open-port")
    href = link.get_attribute("href")
    assert href == f"/v1/sandboxes/{sandbox_id}/ports/{port}/"
    with page.context.expect_page() as opened:
        link.click()
    tab = opened.value
    tab.wait_for_load_state()
    assert "served-by-sandbox" in tab.content()
    tab.close()


def test_fork_pause_resume_buttons_by_role(page, console_app):
    sandbox_id = _create(console_app, "alice")
    login(page, console_app, "vera")
    page.goto(f"{console_app.ui}#/sandbox/{sandbox_id}")
    page.wait_for_selector("#processes[data-loaded='1']", state="attached")
    for name in ("Fork", "Pause"):
        assert page.get_by_role("button", name=name).is_disabled()
    assert page.locator("#open-port").count() == 0
    page.goto(f"{console_app.ui}#/sandboxes")
    page.get_by_role("button", name="Log out").click()
    # An operator acts on another namespace's sandbox; this platform's runtime (local) cannot
    # pause, and the console says so with the API's typed error.
    login(page, console_app, "otto")
    page.goto(f"{console_app.ui}#/sandbox/{sandbox_id}")
    pause = page.get_by_role("button", name="Pause")
    assert pause.is_enabled()
    pause.click()
    page.wait_for_selector("#toast:not([hidden])")
    assert page.locator("#toast strong").inner_text().startswith("not_supported")
    page.get_by_role("button", name="Dismiss").click()
    page.get_by_role("button", name="Fork").click()
    page.wait_for_selector("#toast:not([hidden])")
    assert page.locator("#toast strong").inner_text().startswith("not_supported")
    shot(page, "operator-actions")


def test_one_trace_id_in_admin_scheduler_and_worker_logs_for_a_create(console_app):
    trace_id = uuid.uuid4().hex
    headers = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    with console_app.client("alice") as api:
        resp = api.post("/v1/sandboxes", json={"ttl_seconds": 600}, headers=headers)
        assert resp.status_code == 201, resp.text
        assert resp.headers["x-trace-id"] == trace_id
    logs = Path(console_app.ray_temp) / "session_latest" / "logs"
    marker = f"trace={trace_id}"

    def loggers() -> set[str]:
        found = set()
        for path in logs.glob("worker-*.err"):
            for line in path.read_text(errors="replace").splitlines():
                if marker in line:
                    found.add(line.split(marker)[0].split()[-1])  # the logger's name
        return found

    wanted = {
        "rock_serve.requests",  # the Admin's request line
        "rock_serve.deployments.scheduler",  # "created ... on ..."
        "rock_serve.deployments.worker",  # "created sandbox ..."
    }
    wait_for(lambda: wanted <= loggers(), time.monotonic() + 30, f"{wanted} log lines")


def test_reaps_by_reason_and_paused_charts(page, console_app):
    with console_app.client("root") as api:
        resp = api.post("/v1/sandboxes", json={"ttl_seconds": 1})
        assert resp.status_code == 201, resp.text
        sandbox_id = resp.json()["id"]
    login(page, console_app, "root")
    page.goto(f"{console_app.ui}#/metrics")
    # The Worker's reaper removes it past its TTL; the next sample counts it by reason.
    page.wait_for_selector("svg.chart polyline[data-series='ttl_expired']", timeout=60_000)
    with console_app.client("root") as api:
        assert api.get(f"/v1/sandboxes/{sandbox_id}").status_code == 404
    captions = page.locator("#charts figcaption").all_inner_texts()
    assert {"Reaps by reason", "Paused sandboxes"} <= set(captions)
    label = page.locator("svg.chart[aria-label^='Reaps by reason']").get_attribute("aria-label")
    assert "ttl_expired" in label
    shot(page, "reaps-chart")


def test_pause_and_resume_a_bwrap_sandbox_from_its_page(page, console_app):
    # The local runtime answers not_supported (above); bwrap pauses (the cgroup freezer).
    platform = console_app.bwrap
    if platform is None:
        pytest.skip("bwrap cannot run here")
    with platform.client("otto") as api:
        made = api.post("/v1/sandboxes", json={"ttl_seconds": 600})
        assert made.status_code == 201, made.text
        sandbox_id = made.json()["id"]
        started = api.post(f"/v1/sandboxes/{sandbox_id}/processes", json={"command": "sleep 600"})
        assert started.status_code == 201, started.text
        pid = started.json()["pid"]
        try:
            login(page, platform, "otto")
            page.goto(f"{platform.ui}#/sandbox/{sandbox_id}")
            page.get_by_role("button", name="Pause").click()
            page.get_by_role("button", name="Resume").wait_for()
            assert page.locator("#toast strong").inner_text().startswith("ok")
            assert page.locator("dt:text-is('State') + dd").inner_text() == "paused"
            assert api.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "paused"
            shot(page, "bwrap-paused")
            page.get_by_role("button", name="Dismiss").click()
            page.get_by_role("button", name="Resume").click()
            page.get_by_role("button", name="Pause").wait_for()
            assert page.locator("dt:text-is('State') + dd").inner_text() == "running"
            states = page.locator("#history td:nth-child(2)").all_inner_texts()
            assert states[-2:] == ["paused", "running"]
            # Its processes lived through it, and it runs commands again.
            process = api.get(f"/v1/sandboxes/{sandbox_id}/processes/{pid}").json()
            assert process["running"] is True
            again = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "echo back"})
            assert again.json()["stdout"] == "back\n"
            shot(page, "bwrap-resumed")
        finally:
            api.delete(f"/v1/sandboxes/{sandbox_id}")
