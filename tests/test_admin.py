"""Tests of the admin commands (node.admin) through an argparse parser built like cli.py's."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node import admin, config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "ainode.toml"
STATUS_SUCCESS = 0x0000

HAND_WRITTEN = """\
[node]
ae_title = "AINODE"

# Scanners
[[callers]]
ae_title = "CT01"   # room 1
host = "10.0.0.21"
# (was 10.0.0.20 until May)

# The second scanner
[[callers]]
ae_title = "CT02"

# Where results go.
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 104

# trailing comment at end of file
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run one `ainode` command in-process; return exit code, stdout, stderr."""
    parser = argparse.ArgumentParser(prog="ainode")
    parser.add_argument("--config")
    sub = parser.add_subparsers(dest="command", required=True)
    admin.add_commands(sub)
    args = parser.parse_args(list(argv))
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_CONFIG, raising=False)


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    """A copy of the embedded default config."""
    path = tmp_path / "ainode.toml"
    shutil.copyfile(DEFAULT_CONFIG, path)
    return path


@pytest.fixture
def hand_file(tmp_path: Path) -> Path:
    """A config with entries and comments between them."""
    path = tmp_path / "hand.toml"
    path.write_text(HAND_WRITTEN, encoding="utf-8")
    return path


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def echo_scp() -> Iterator[tuple[int, list[str]]]:
    """A real Verification SCP called PACS on 127.0.0.1; yields its port and the calling AE titles seen."""
    seen: list[str] = []

    def handle_echo(event: evt.Event) -> int:
        seen.append(event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, handle_echo)])
    assert server is not None
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()


# ---------------------------------------------------------------- ae


def test_ae_list_without_callers_says_any_is_accepted(capsys, cfg_file):
    rc, out, _ = run(capsys, "--config", str(cfg_file), "ae", "list")
    assert rc == 0
    assert "any calling AE title is accepted" in out


def test_allow_deny_round_trip_keeps_the_file(capsys, cfg_file, caplog):
    original = cfg_file.read_bytes()
    with caplog.at_level(logging.INFO, logger="node.admin"):
        rc, out, err = run(capsys, "--config", str(cfg_file), "ae", "allow", "CT01", "--host", "10.0.0.21")
    assert (rc, err) == (0, "")
    assert "Allowed CT01 from 10.0.0.21" in out
    assert "SIGHUP (systemctl reload ainode)" in out
    assert any("allowed caller CT01 from 10.0.0.21" in r.getMessage() for r in caplog.records)
    text = cfg_file.read_bytes()
    # the whole default file, comments included, is kept; a real table is appended
    assert text.startswith(original)
    assert text[len(original):] == b'\n[[callers]]\nae_title = "CT01"\nhost = "10.0.0.21"\n'
    assert config.load(cfg_file).callers == (config.Caller("CT01", "10.0.0.21"),)

    rc, out, _ = run(capsys, "--config", str(cfg_file), "ae", "allow", "CT01", "--host", "10.0.0.21")
    assert rc == 0 and "already allowed" in out
    assert cfg_file.read_bytes() == text

    assert run(capsys, "--config", str(cfg_file), "ae", "allow", "CT02")[0] == 0
    rc, out, _ = run(capsys, "--config", str(cfg_file), "ae", "list")
    assert rc == 0
    assert out.splitlines() == ["CT01  10.0.0.21", "CT02  any host"]

    rc, out, _ = run(capsys, "--config", str(cfg_file), "ae", "deny", "CT01")
    assert rc == 0 and "Denied CT01 from 10.0.0.21" in out
    assert config.load(cfg_file).callers == (config.Caller("CT02"),)
    rc, out, _ = run(capsys, "--config", str(cfg_file), "ae", "deny", "CT02")
    assert rc == 0 and "any calling AE title is now accepted" in out
    assert cfg_file.read_bytes() == original


def test_deny_with_host_removes_only_that_binding(capsys, cfg_file):
    for host in ("10.0.0.21", "10.0.0.22"):
        assert run(capsys, "--config", str(cfg_file), "ae", "allow", "CT01", "--host", host)[0] == 0
    rc, _, _ = run(capsys, "--config", str(cfg_file), "ae", "deny", "CT01", "--host", "10.0.0.21")
    assert rc == 0
    assert config.load(cfg_file).callers == (config.Caller("CT01", "10.0.0.22"),)


def test_edits_keep_comments_between_entries(capsys, hand_file):
    cfg = ["--config", str(hand_file)]
    assert run(capsys, *cfg, "ae", "allow", "CT03")[0] == 0
    assert run(capsys, *cfg, "dest", "add", "pacs2", "--ae", "PACS2", "--host", "10.0.0.6", "--port", "11112")[0] == 0
    text = hand_file.read_text()
    assert text.index('ae_title = "CT02"') < text.index('ae_title = "CT03"') < text.index("# Where results go.")
    assert text.endswith('port = 11112\n\n# trailing comment at end of file\n')
    assert run(capsys, *cfg, "ae", "deny", "CT03")[0] == 0
    assert run(capsys, *cfg, "dest", "remove", "pacs2")[0] == 0
    assert hand_file.read_text() == HAND_WRITTEN

    # removing an entry removes its own lines and nothing else
    assert run(capsys, *cfg, "ae", "deny", "CT01")[0] == 0
    removed = '[[callers]]\nae_title = "CT01"   # room 1\nhost = "10.0.0.21"\n# (was 10.0.0.20 until May)\n'
    assert hand_file.read_text() == HAND_WRITTEN.replace(removed, "")
    assert run(capsys, *cfg, "dest", "remove", "pacs")[0] == 0
    assert "# Where results go.\n\n# trailing comment at end of file\n" in hand_file.read_text()


def test_dest_add_chooses_the_objects(capsys, cfg_file):
    assert run(capsys, "--config", str(cfg_file), "dest", "add", "viewer", "--ae", "OHIF", "--host", "10.0.0.7",
               "--port", "104", "--objects", "sr")[0] == 0
    assert run(capsys, "--config", str(cfg_file), "dest", "add", "pacs", "--ae", "PACS", "--host", "10.0.0.5",
               "--port", "104")[0] == 0
    by_name = {d.name: d for d in config.load(cfg_file).destinations}
    assert by_name["viewer"].objects == ("sr",) and by_name["pacs"].objects == ("sr", "sc", "ko")
    assert 'objects = ["sr"]' in cfg_file.read_text() and cfg_file.read_text().count("\nobjects =") == 1
    rc, out, _ = run(capsys, "--config", str(cfg_file), "dest", "list")
    assert rc == 0
    assert "gets SR (comprehensive)\n" in out and "gets SR (comprehensive), summary image, key objects" in out


def test_edit_keeps_mode_and_leaves_no_temp_file(capsys, cfg_file):
    os.chmod(cfg_file, 0o640)
    assert run(capsys, "--config", str(cfg_file), "ae", "allow", "CT01")[0] == 0
    assert stat.S_IMODE(cfg_file.stat().st_mode) == 0o640
    assert [p.name for p in cfg_file.parent.iterdir()] == [cfg_file.name]


# ---------------------------------------------------------------- refused input


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["ae", "allow", "ABCDEFGHIJKLMNOPQ"], "must be 1 to 16 characters, got 17"),
        (["ae", "allow", "CT01", "--host", "not a host!"], "--host"),
        (["ae", "deny", "NOPE"], "no caller 'NOPE'"),
        (["ae", "deny", "CT01", "--host", "10.9.9.9"], "bound to host 10.9.9.9"),
        (["dest", "add", "x", "--ae", "ABCDEFGHIJKLMNOPQ", "--host", "h", "--port", "104"], "--ae"),
        (["dest", "add", "x", "--ae", "X", "--host", "h", "--port", "0"], "--port: must be between 1 and 65535, got 0"),
        (["dest", "add", "x", "--ae", "X", "--host", "h", "--port", "abc"], "--port: must be an integer"),
        (["dest", "add", "bad name", "--ae", "X", "--host", "h", "--port", "104"], "name"),
        (["dest", "add", "pacs", "--ae", "X", "--host", "h", "--port", "104"], "'pacs' already exists"),
        (["dest", "add", "x", "--ae", "X", "--host", "h", "--port", "104", "--objects", "sr,pdf"], "--objects"),
        (["dest", "add", "x", "--ae", "X", "--host", "h", "--port", "104", "--objects", "sr,sr"], "--objects"),
        (["dest", "remove", "nope"], "no destination 'nope'"),
        (["dest", "echo", "nope"], "no destination 'nope'"),
        (["dest", "echo", "pacs", "--timeout", "soon"], "--timeout"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_file_untouched(capsys, cfg_file, argv, reason):
    assert run(capsys, "--config", str(cfg_file), "ae", "allow", "CT01", "--host", "10.0.0.21")[0] == 0
    assert run(capsys, "--config", str(cfg_file), "dest", "add", "pacs", "--ae", "PACS",
               "--host", "10.0.0.5", "--port", "104")[0] == 0
    before = cfg_file.read_bytes()
    rc, out, err = run(capsys, "--config", str(cfg_file), *argv)
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("ainode: error: ")
    assert reason in err
    assert cfg_file.read_bytes() == before


def test_no_config_file_to_edit(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "CHECKOUT_CONFIG", tmp_path / "absent.toml")
    rc, _, err = run(capsys, "ae", "allow", "CT01")
    assert rc == 2
    assert err == "ainode: error: no config file to edit: pass --config PATH or set AINODE_CONFIG\n"


def test_env_config_is_used(capsys, monkeypatch, cfg_file):
    monkeypatch.setenv(config.ENV_CONFIG, str(cfg_file))
    assert run(capsys, "ae", "allow", "CT01")[0] == 0
    assert config.load(cfg_file).callers == (config.Caller("CT01"),)


def test_invalid_file_is_not_edited(capsys, cfg_file):
    text = cfg_file.read_text().replace('ae_title = "AINODE"', 'ae_title = "ABCDEFGHIJKLMNOPQ"')
    cfg_file.write_text(text)
    rc, _, err = run(capsys, "--config", str(cfg_file), "ae", "allow", "CT01")
    assert rc == 2 and "[node] ae_title" in err
    assert cfg_file.read_text() == text


def test_layout_tomlkit_cannot_keep_is_refused(capsys, tmp_path):
    path = tmp_path / "split.toml"
    text = '[[callers]]\nae_title = "A"\n\n[node]\nport = 104\n\n[[callers]]\nae_title = "B"\n'
    path.write_text(text)
    rc, _, err = run(capsys, "--config", str(path), "ae", "allow", "C")
    assert rc == 2 and "edit it by hand" in err
    assert path.read_text() == text


# ---------------------------------------------------------------- config check


def test_config_check_ok(capsys, cfg_file, redis_server):
    text = cfg_file.read_text().replace('url = ""', f'url = "{redis_server.url}"')
    cfg_file.write_text(text)
    assert run(capsys, "--config", str(cfg_file), "dest", "add", "pacs", "--ae", "PACS",
               "--host", "10.0.0.5", "--port", "104")[0] == 0
    rc, out, err = run(capsys, "--config", str(cfg_file), "config", "check")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"OK: {cfg_file.resolve()}"
    assert "AINODE" in out and "127.0.0.1:11112" in out
    assert redis_server.url in out
    assert "model:        ainode-lung-ct" in out
    assert "pacs (PACS@10.0.0.5:104)" in out
    assert "0 (any calling AE title is accepted)" in out


def test_config_check_invalid(capsys, cfg_file):
    cfg_file.write_text(cfg_file.read_text().replace("port = 11112", "port = 0"))
    rc, out, err = run(capsys, "--config", str(cfg_file), "config", "check")
    assert rc == 2 and out == ""
    assert err == f"ainode: error: {cfg_file}: [node] port: must be between 1 and 65535, got 0\n"


@pytest.mark.parametrize("key, value, says", [
    ("[model]", 'path = "/nonexistent/model.onnx"', "[model] path: model file /nonexistent/model.onnx not found"),
    ("[node]", 'storage = "/proc/ainode-cannot-be-here"', "[node] storage: /proc/ainode-cannot-be-here cannot be created"),
    ("[redis]", 'url = "redis://:s3cret@127.0.0.1:1/0"', "[redis] url: redis://:***@127.0.0.1:1/0 does not answer"),
])
def test_config_check_names_the_key_of_what_serve_would_lack(capsys, tmp_path, key, value, says):
    path = tmp_path / "ainode.toml"
    path.write_text(f"{key}\n{value}\n")
    rc, out, err = run(capsys, "--config", str(path), "config", "check")
    assert (rc, out) == (2, "")
    assert err.startswith(f"ainode: error: {says}") and err.count("\n") == 1
    assert "s3cret" not in err


def test_a_host_that_looks_like_an_address_must_be_one(capsys, cfg_file):
    rc, _, err = run(capsys, "--config", str(cfg_file), "ae", "allow", "CT02", "--host", "999.1.1.1")
    assert rc == 2 and err == "ainode: error: --host: '999.1.1.1' is not a valid IPv4 address\n"


def test_global_options_may_follow_the_subcommand(capsys, cfg_file):
    from node.cli import main

    assert main(["config", "check", "--config", str(cfg_file), "--log-level", "warning"]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {cfg_file.resolve()}")


def test_serve_on_a_port_in_use_names_the_address(tmp_path):
    import subprocess
    import sys

    from tests.peers import write_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "ainode.toml", port=port, storage=tmp_path / "storage")
        res = subprocess.run([sys.executable, "-m", "node", "serve", "--workers", "-1", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == \
        f"ainode: error: [node] port: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize(
    "url, masked",
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h:6379", "redis://user:***@h:6379"),
        ("rediss://h:6380/1", "rediss://h:6380/1"),
        ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
    ],
)
def test_mask_url(url, masked):
    assert admin.mask_url(url) == masked


# ---------------------------------------------------------------- dest echo


def test_dest_echo_success(capsys, cfg_file, echo_scp):
    port, seen = echo_scp
    cfg = ["--config", str(cfg_file)]
    assert run(capsys, *cfg, "dest", "add", "pacs", "--ae", "PACS", "--host", "127.0.0.1", "--port", str(port))[0] == 0
    rc, out, err = run(capsys, *cfg, "dest", "echo", "pacs", "--timeout", "5")
    assert (rc, err) == (0, "")
    assert out.startswith(f"pacs (PACS@127.0.0.1:{port}): C-ECHO success (0x0000) in ")
    assert out.endswith(" ms\n")
    assert seen == ["AINODE"]  # called from the node's own AE title


def test_dest_echo_rejected(capsys, cfg_file, echo_scp):
    port, seen = echo_scp
    cfg = ["--config", str(cfg_file)]
    assert run(capsys, *cfg, "dest", "add", "wrong", "--ae", "NOTPACS", "--host", "127.0.0.1", "--port", str(port))[0] == 0
    rc, out, err = run(capsys, *cfg, "dest", "echo", "wrong", "--timeout", "5")
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert "association rejected" in err and "Called AE title not recognised" in err
    assert seen == []


def test_dest_echo_closed_port(capsys, cfg_file):
    port = free_port()
    cfg = ["--config", str(cfg_file)]
    assert run(capsys, *cfg, "dest", "add", "gone", "--ae", "PACS", "--host", "127.0.0.1", "--port", str(port))[0] == 0
    start = time.monotonic()
    rc, out, err = run(capsys, *cfg, "dest", "echo", "gone", "--timeout", "2")
    assert time.monotonic() - start < 10
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"ainode: error: gone (PACS@127.0.0.1:{port}): no association: cannot connect")


def test_dest_echo_peer_without_verification(capsys, cfg_file):
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        cfg = ["--config", str(cfg_file)]
        port = str(server.server_address[1])
        assert run(capsys, *cfg, "dest", "add", "pacs", "--ae", "PACS", "--host", "127.0.0.1", "--port", port)[0] == 0
        rc, out, err = run(capsys, *cfg, "dest", "echo", "pacs", "--timeout", "5")
    finally:
        server.shutdown()
    assert rc == 1 and out == "" and len(err.splitlines()) == 1
    assert "accepted no Verification context" in err


def test_dest_echo_silent_peer_times_out(capsys, cfg_file):
    with socket.socket() as listener:  # accepts TCP connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = str(listener.getsockname()[1])
        cfg = ["--config", str(cfg_file)]
        assert run(capsys, *cfg, "dest", "add", "mute", "--ae", "PACS", "--host", "127.0.0.1", "--port", port)[0] == 0
        start = time.monotonic()
        rc, out, err = run(capsys, *cfg, "dest", "echo", "mute", "--timeout", "1")
        assert time.monotonic() - start < 10
    assert rc == 1 and out == "" and len(err.splitlines()) == 1
    assert "did not accept the association within 1 s" in err


def test_dest_echo_unresolvable_host(capsys, cfg_file):
    cfg = ["--config", str(cfg_file)]
    assert run(capsys, *cfg, "dest", "add", "nx", "--ae", "PACS", "--host", "no-such-host.invalid", "--port", "104")[0] == 0
    rc, out, err = run(capsys, *cfg, "dest", "echo", "nx", "--timeout", "2")
    assert rc == 1 and out == "" and len(err.splitlines()) == 1
    assert "cannot connect to no-such-host.invalid" in err


# ---------------------------------------------------------------- pipelines and destination kinds


def test_first_pipeline_added_keeps_the_node_ae_title_one(capsys, cfg_file):
    cfg = ["--config", str(cfg_file)]
    assert run(capsys, *cfg, "dest", "add", "pacs", "--ae", "PACS", "--host", "10.0.0.5", "--port", "104")[0] == 0
    assert run(capsys, *cfg, "dest", "add", "ris", "--kind", "hl7", "--host", "10.0.0.7", "--port", "2575",
               "--application", "RIS")[0] == 0
    rc, out, _ = run(capsys, *cfg, "pipeline", "list")
    assert rc == 0 and "One pipeline, from [node] ae_title" in out and "AINODE: analyse with bundled model" in out
    rc, out, _ = run(capsys, *cfg, "pipeline", "add", "RESEARCH", "--model", "none", "--dest", "pacs", "--quiet", "5")
    assert rc == 0 and "Wrote the node's pipeline AINODE" in out
    loaded = config.load(cfg_file)
    assert [p.name for p in loaded.pipelines] == ["AINODE", "RESEARCH"]
    assert loaded.pipelines[0].destinations == ("pacs", "ris")  # what reached the node before still does
    assert loaded.pipeline("RESEARCH").forwards and loaded.quiet_seconds(loaded.pipeline("RESEARCH")) == 5.0
    rc, out, _ = run(capsys, *cfg, "pipeline", "show", "AINODE")
    assert rc == 0 and "model:           ainode-lung-ct" in out and "destination:     ris (HL7 10.0.0.7:2575)" in out
    rc, out, _ = run(capsys, *cfg, "dest", "list")
    assert "ris   (HL7 10.0.0.7:2575)  gets ORU^R01 naming the SR  pipelines: AINODE" in out
    rc, _, err = run(capsys, *cfg, "dest", "remove", "pacs")
    assert rc == 2 and "used by pipeline AINODE, RESEARCH" in err
    assert run(capsys, *cfg, "pipeline", "remove", "RESEARCH")[0] == 0
    rc, _, err = run(capsys, *cfg, "pipeline", "remove", "AINODE")
    assert rc == 2 and "is the only pipeline" in err
    rc, out, _ = run(capsys, *cfg, "config", "check")
    assert rc == 0 and "pipeline:     AINODE: analyse" in out


@pytest.mark.parametrize("argv, reason", [
    (["pipeline", "add", "X", "--dest", "nope"], "'nope' is not a [[destinations]] name"),
    (["pipeline", "add", "ABCDEFGHIJKLMNOPQ"], "must be 1 to 16 characters"),
    (["pipeline", "add", "X", "--threshold", "high"], "--threshold: must be a number"),
    (["pipeline", "add", "AINODE"], "is already the node's pipeline"),
    (["pipeline", "show", "NOPE"], "no pipeline 'NOPE'"),
    (["pipeline", "remove", "NOPE"], "no pipeline 'NOPE' in [[pipelines]]"),
    (["dest", "add", "w", "--kind", "dicomweb"], "--url: is required for --kind dicomweb"),
    (["dest", "add", "w", "--kind", "dicomweb", "--url", "https://x/dw", "--ae", "X"], "--ae: does not apply"),
    (["dest", "add", "w", "--kind", "dicomweb", "--url", "https://u:p@x/dw"], "must not hold credentials"),
    (["dest", "add", "h", "--kind", "hl7", "--host", "10.0.0.7"], "--port: is required for --kind hl7"),
])
def test_pipeline_and_kind_mistakes_exit_2_and_leave_the_file(capsys, cfg_file, argv, reason):
    before = cfg_file.read_text()
    rc, _, err = run(capsys, "--config", str(cfg_file), *argv)
    assert rc == 2 and reason in err and err.count("\n") == 1, err
    assert cfg_file.read_text() == before


def test_a_dicomweb_destination_is_written_with_its_auth_file(capsys, cfg_file, tmp_path):
    rc, out, _ = run(capsys, "--config", str(cfg_file), "dest", "add", "archive", "--kind", "dicomweb", "--url",
                     "https://archive.example.org/dicom-web", "--auth-file", str(tmp_path / "token"))
    assert rc == 0 and "DICOMweb https://archive.example.org/dicom-web, token from" in out
    dest = config.load(cfg_file).destination("archive")
    assert (dest.kind, dest.auth_file) == ("dicomweb", str(tmp_path / "token"))
