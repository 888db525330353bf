"""The results page as people use it: an admin in headless Chromium (puppeteer-core, Debian's chromium) logs
in, finds a study that went through the node end to end, opens it and re-analyses it; a viewer may look
but not act; a form without its CSRF token is refused; a wrong password is audited. Screenshots go to
$AINODE_ARTIFACTS (else tests/artifacts/)."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.peers import NodeProcess, Orthanc, free_port, have, short_tmp, storescu, wait_until
from tests.viewer import _kill_group, _last_json, chromium_binary, ohif_cache_dir, puppeteer_dir

pytestmark = pytest.mark.skipif(not (have("storescu") and have("Orthanc")), reason="needs DCMTK and Orthanc")
DRIVER = Path(__file__).parent / "web" / "admin_session.js"
ADMIN, VIEWER = ("ada", "a long admin passphrase"), ("vic", "a long viewer passphrase")


def artifacts() -> Path:
    path = Path(os.environ.get("AINODE_ARTIFACTS") or Path(__file__).parent / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """A cookie-keeping HTTP client, for what needs no JavaScript."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def request(self, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.base + path, data=data, timeout=20) as rsp:
                return rsp.status, rsp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except urllib.error.URLError:
            return 0, ""  # nothing listens (yet)

    def fetch(self, path: str) -> tuple[int, bytes]:
        try:
            with self.opener.open(self.base + path, timeout=20) as rsp:
                return rsp.status, rsp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def login(self, user: str, password: str) -> tuple[int, str]:
        return self.request("/login", {"user": user, "password": password})

    def csrf(self, path: str) -> str:
        _, page = self.request(path)
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match, "no CSRF token on the page"
        return match.group(1)



def add_user(node: NodeProcess, name: str, password: str, role: str) -> None:
    subprocess.run([sys.executable, "-m", "node", "user", "add", name, "--role", role, "--config", str(node.config)],
                   input=password + "\n", text=True, check=True, capture_output=True)


def test_an_admin_reanalyses_from_the_page_and_a_viewer_cannot(nodes, test_model, lung1_series):
    pacs = Orthanc(short_tmp("orthanc-")).start()
    try:
        _session(nodes, test_model, lung1_series, pacs)
    finally:
        pacs.stop()


def node_with_page(nodes, test_model, destination: str, ae: str, port: int, send: str = "") -> tuple[NodeProcess, str]:
    """A node with the test model, one destination (the SR only), the web page and its two users; started.
    Returns it and the page's base URL."""
    web_port = free_port()
    extra = (f'[model]\npath = "{test_model}"\ndevice = "cpu"\n{send}'
             f'[[destinations]]\nname = "{destination}"\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
             'objects = ["sr"]\n')
    node = NodeProcess(short_tmp(), quiet=1.0, workers=1, extra_config=extra, web_port=web_port)
    nodes.append(node)
    add_user(node, *ADMIN, "admin")
    add_user(node, *VIEWER, "viewer")
    node.start()
    base = f"http://127.0.0.1:{web_port}"
    wait_until(lambda: Browser(base).request("/healthz")[0] == 200, 30, "the web process")
    return node, base


def _session(nodes, test_model, lung1_series, pacs) -> None:
    node, base = node_with_page(nodes, test_model, "pacs", "ORTHANC", pacs.port)
    assert oct((node.storage / "users.json").stat().st_mode & 0o777) == "0o600"
    assert "a long admin passphrase" not in (node.storage / "users.json").read_text()
    assert storescu(lung1_series, node.port).returncode == 0
    study = str(pydicom.dcmread(lung1_series[0], stop_before_pixels=True).StudyInstanceUID)
    wait_until(lambda: pacs.instances_of_study(study, "SR"), 90, "the SR at the PACS")

    # logged out: the page sends to the login, the API says 401
    anon = Browser(base)
    status, page = anon.request("/")
    assert status == 200 and 'action="/login"' in page
    assert anon.request("/api/studies")[0] == 401
    # a wrong password: refused and audited with the name tried
    assert anon.login("ada", "not the passphrase")[0] == 401
    # a viewer sees the study, but may not act, even with the right CSRF token
    viewer = Browser(base)
    assert viewer.login(*VIEWER)[0] == 200
    status, listing = viewer.request("/")
    assert status == 200 and study in listing and "DEMO^LUNG1" in listing
    assert "STORESCU &rarr; AINODE" in listing  # who sent it, to which pipeline
    # filtered by when it was last active: a span back from now, or a date
    assert study in viewer.request("/?since=1h")[1] and study in viewer.request("/?since=2001-01-01&state=sent")[1]
    later = viewer.request("/?since=2999-01-01")[1]
    assert study not in later and "active since 2999-01-01" in later
    status, page = viewer.request("/?since=yesterday")
    assert status == 400 and "neither a duration" in page
    assert viewer.request("/api/studies?since=yesterday")[0] == 400
    assert [r["study_uid"] for r in json.loads(viewer.request("/api/studies?since=30d")[1])] == [study]
    status, page = viewer.request(f"/studies/{study}")
    assert status == 200 and 'id="reanalyse"' not in page  # no buttons for a viewer
    token = viewer.csrf(f"/studies/{study}")  # the logout form's
    assert viewer.request(f"/studies/{study}/reanalyse", {"csrf": token})[0] == 403
    # an admin's form without its CSRF token (a forged cross-site post) is refused
    admin = Browser(base)
    assert admin.login(*ADMIN)[0] == 200
    assert admin.request(f"/studies/{study}/reanalyse", {"csrf": "forged"})[0] == 403
    assert admin.request(f"/studies/{study}/reanalyse", {})[0] == 403
    status, body = admin.request(f"/api/studies/{study}")
    assert status == 200 and json.loads(body)["state"]["state"] == "sent"
    assert len(list((node.storage / "state" / study).glob("rev-*.json"))) >= 1
    assert [p.name for p in (node.storage / "state" / study).glob("rev-0002.json")] == []  # nothing done yet

    # the admin, in a real browser
    reason = _browser_unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    shots = artifacts()
    run = _admin_session(base, study, shots)
    assert run["ok"], run
    assert run["listed"] and run["revision_before"] == "revision 1" and run["message"] == "revision 2 queued"
    assert run["score"] and run["score"].endswith("%")
    assert run["pipeline"] == "AINODE"
    assert run["image"]  # the result image (here the key slice: this PACS gets no summary image) is shown
    words = run["report"]
    assert "Imaging Measurement Report" in words and "demo model, not for clinical use" in words
    assert "Probability of cancer" in words and "image " in words  # images named by Instance Number
    assert all(Path(p).stat().st_size > 5000 for p in run["shots"])
    wait_until(lambda: len(pacs.instances_of_study(study, "SR")) == 2, 30, "the second SR at the PACS")

    events = [json.loads(line) for line in (node.storage / "audit.jsonl").read_text().splitlines()]
    logins = [e for e in events if e["event_id"]["code"] == "110114"]
    refused = [e for e in logins if e["outcome"] == 4]
    assert any(e["participants"][0]["user_id"] == "ada" and "wrong user name or password" in
               e["outcome_description"] for e in refused)
    assert any("CSRF" in e["outcome_description"] for e in refused)
    assert {e["participants"][0]["user_id"] for e in logins if e["outcome"] == 0} >= {"ada", "vic"}
    actions = [e["outcome_description"] for e in events if "requested by ada (web" in e["outcome_description"]]
    assert len(actions) == 1 and actions[0].startswith("reanalyse requested by ada")


def _browser_unavailable() -> str | None:
    missing = []
    if chromium_binary() is None:
        missing.append("chromium")
    if not have("node") or not (puppeteer_dir() / "package.json").exists():
        missing.append("node + puppeteer-core (bash tests/ohif/install.sh)")
    return f"the page's browser test needs {', '.join(missing)}" if missing else None


def _admin_session(base: str, study: str, shots: Path) -> dict:
    args = {"base": base, "user": ADMIN[0], "password": ADMIN[1], "study": study, "shots": str(shots),
            "chromium": chromium_binary(), "timeoutMs": 100000}
    env = {**os.environ, "NODE_PATH": str(ohif_cache_dir() / "node_modules"), "WEB_ARGS": json.dumps(args)}
    proc = subprocess.Popen(["node", str(DRIVER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate(timeout=10)
    finally:
        _kill_group(proc)
    result = _last_json(out)
    assert result is not None, f"admin_session.js exited {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return result


def test_an_admin_retries_a_dead_letter_from_the_page(nodes, test_model, lung1_series, tmp_path):
    from tests.peers import dcmtk_env, stop_process

    pacs_port = free_port()  # nothing listens there yet: every try fails
    node, base = node_with_page(nodes, test_model, "gone", "GONE", pacs_port,
                                send="[send]\nretry_hours = 0.0003\nretry_first_seconds = 1\ntimeout_seconds = 2\n")
    assert storescu(lung1_series[:12], node.port).returncode == 0
    study = str(pydicom.dcmread(lung1_series[0], stop_before_pixels=True).StudyInstanceUID)
    state = node.storage / "state" / study / "rev-0001.send-gone.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text())["status"] == "dead", 90, "the dead letter")

    viewer = Browser(base)
    assert viewer.login(*VIEWER)[0] == 200
    page = viewer.request(f"/studies/{study}")[1]
    assert 'id="deliveries"' in page and ">dead<" in page and 'id="retry-gone"' not in page  # a viewer sees, only
    status, png = viewer.fetch(f"/studies/{study}/image.png")  # the key slice, with its findings circled
    assert status == 200 and png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20000
    assert Browser(base).fetch(f"/studies/{study}/image.png")[0] == 401  # patient data: logged in only
    admin = Browser(base)
    assert admin.login(*ADMIN)[0] == 200
    page = admin.request(f"/studies/{study}")[1]
    assert 'id="retry-gone"' in page
    scp = subprocess.Popen(["storescp", "-aet", "GONE", "-od", str(tmp_path), str(pacs_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env())
    try:
        status, page = admin.request(f"/studies/{study}/resend", {"csrf": admin.csrf(f"/studies/{study}"),
                                                                  "dest": "gone"})
        assert status == 200 and "1 delivery(ies) queued to gone" in page
        wait_until(lambda: json.loads(state.read_text())["status"] == "sent", 60, "the retried delivery")
        assert len(list(tmp_path.iterdir())) == 1  # the SR
        # a destination added since the web process started: the page sends to it too
        subprocess.run([sys.executable, "-m", "node", "--config", str(node.config), "dest", "add", "again", "--ae",
                        "GONE", "--host", "127.0.0.1", "--port", str(pacs_port), "--objects", "sr"], check=True,
                       capture_output=True)
        status, page = admin.request(f"/studies/{study}/resend", {"csrf": admin.csrf(f"/studies/{study}"),
                                                                  "dest": "again"})
        assert status == 200 and "1 delivery(ies) queued to again" in page
        again = state.with_name("rev-0001.send-again.json")
        wait_until(lambda: again.exists() and json.loads(again.read_text())["status"] == "sent", 60, "the new one")
    finally:
        stop_process(scp)
    trail = (node.storage / "audit.jsonl").read_text()
    assert "resend requested by ada (web" in trail and "queued to gone" in trail
