"""DICOM TLS against real peers on 127.0.0.1, with certificates made by openssl in the test.

Receive: DCMTK echoscu/storescu with +tls and a pynetdicom SCU associate; a
plain client, a client without a certificate and one whose certificate another
CA signed are refused (and audited); a client that connects and says nothing
holds up no one. Send: ainode's send job delivers an SR to DCMTK storescp
with +tls (which requires and checks ainode's client certificate).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from node import config
from node.config import Destination, TLSConfig
from node.errors import ConfigError
from node.tls import HANDSHAKE_TIMEOUT_S, client_context, server_context
from tests.peers import NodeProcess, dcmtk_env, free_port, have, short_tmp, wait_until

pytestmark = pytest.mark.skipif(not (have("openssl") and have("echoscu")), reason="needs openssl and DCMTK")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# ------------------------------------------------------------------ certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str = "IP:127.0.0.1,DNS:localhost") -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}/O=ainode tests", cwd=d)
    (d / f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    (d / f"{name}.key").chmod(0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (trusted) signs node, ct01 and pacs; rogue-ca signs rogue (an untrusted client)."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "node", "ca")
    _leaf(d, "ct01", "ca")
    _leaf(d, "pacs", "ca")
    _leaf(d, "rogue", "rogue-ca")
    _leaf(d, "elsewhere", "ca", san="DNS:pacs.example.org")  # names another host
    return d


def tls_section(pki: Path, *, port: int, require_client_cert: bool = True) -> str:
    return (f"[tls]\nenabled = true\nport = {port}\ncert = \"{pki / 'node.pem'}\"\nkey = \"{pki / 'node.key'}\"\n"
            f"ca = \"{pki / 'ca.pem'}\"\nrequire_client_cert = {'true' if require_client_cert else 'false'}\n")


# ------------------------------------------------------------------ config


def test_config_requires_readable_files_and_names_the_key(pki, tmp_path):
    def err(text: str) -> str:
        with pytest.raises(ConfigError) as e:
            config.parse_text(text, "a.toml")
        return str(e.value)

    assert err("[tls]\nenabled = true\n") == "a.toml: [tls] cert: is required when [tls] enabled = true"
    missing = tmp_path / "nope.pem"
    assert err(f'[tls]\nenabled = true\ncert = "{pki / "node.pem"}"\nkey = "{missing}"\n') == \
        f"a.toml: [tls] key: {missing}: no such file"
    assert "[tls] ca: is required when require_client_cert" in err(
        f'[tls]\nenabled = true\ncert = "{pki / "node.pem"}"\nkey = "{pki / "node.key"}"\nrequire_client_cert = true\n')
    assert err("[node]\nport = 0\n") == "a.toml: [node] port: must be between 1 and 65535, got 0"
    assert "[tls] port: must differ from [node] port" in err(
        f'[node]\nport = 2762\n[tls]\nenabled = true\ncert = "{pki / "node.pem"}"\nkey = "{pki / "node.key"}"\n')
    assert err(  # a TLS destination: cert and key together, or neither
        f'[tls]\ncert = "{pki / "node.pem"}"\n[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\n'
        "tls = true\n") == "a.toml: [tls] key: cert and key go together: give both or neither"
    cfg = config.parse_text(
        '[node]\nport = 0\n[tls]\nenabled = true\ncert = "node.pem"\nkey = "node.key"\n', "a.toml", base=pki)
    assert cfg.node.port == 0 and cfg.tls.cert == str(pki / "node.pem")  # relative paths made absolute


def test_bad_key_is_named_never_shown(pki, tmp_path):
    key_text = (pki / "ct01.key").read_text()
    mismatched = TLSConfig(enabled=True, cert=str(pki / "node.pem"), key=str(pki / "ct01.key"))
    with pytest.raises(ConfigError) as e:
        server_context(mismatched, "a.toml")
    assert str(e.value).startswith(f"a.toml: [tls] key: {pki / 'ct01.key'} does not load with cert")
    assert "PRIVATE" not in str(e.value) and key_text[40:80] not in str(e.value)
    encrypted = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki / "node.key"), "-aes256", "-passout", "pass:x",
                    "-out", str(encrypted)], check=True, capture_output=True)
    with pytest.raises(ConfigError, match="is encrypted"):  # and no pass phrase prompt on a terminal
        server_context(TLSConfig(enabled=True, cert=str(pki / "node.pem"), key=str(encrypted)), "a.toml")


def test_config_check_shows_tls_without_secrets(pki, tmp_path, capsys):
    from node.cli import main

    cfg = tmp_path / "ainode.toml"
    cfg.write_text(f'[node]\nport = 0\nstorage = "{tmp_path}"\n' + tls_section(pki, port=2762)
                   + '[audit]\nsyslog = "tcp://127.0.0.1:6514"\n'
                   + '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 2762\n'
                   + "tls = true\n")
    assert main(["--config", str(cfg), "config", "check"]) == 0
    out = capsys.readouterr().out
    assert "plain port off" in out and "TLS on 127.0.0.1:2762" in out
    assert "client certificate required" in out and "CN=node" in out and "(not shown)" in out
    assert "pacs (PACS@127.0.0.1:2762, TLS)" in out and "syslog tcp://127.0.0.1:6514" in out
    key = (pki / "node.key").read_text()
    assert "PRIVATE KEY" not in out and key.splitlines()[1] not in out


# ------------------------------------------------------------------ receive


def echoscu_tls(port: int, pki: Path, name: str | None, calling: str = "CT01",
                extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """DCMTK echoscu over TLS, presenting ``name``'s certificate (None: anonymous, no certificate)."""
    auth = ["+tls", str(pki / f"{name}.key"), str(pki / f"{name}.pem")] if name else ["+tla"]
    return subprocess.run(
        ["echoscu", "-to", "5", "-ta", "5", "-td", "5", *auth, "+cf", str(pki / "ca.pem"), *extra,
         "-aet", calling, "-aec", "AINODE", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=30, env=dcmtk_env(),
    )


def pynetdicom_store(port: int, pki: Path, name: str | None) -> tuple[bool, int | None]:
    """(association established, C-STORE status) of a pynetdicom SCU over TLS."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if name:
        ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(CT_IMAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False, None
    try:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        return True, int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def audit_events(node: NodeProcess) -> list[dict]:
    path = node.storage / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_tls_node(nodes: list, pki: Path, *, plain: bool, require_client_cert: bool = True) -> NodeProcess:
    """A node with a TLS port (``node.tls_port``) and, with ``plain``, its plain port too."""
    tls_port = free_port()
    node = NodeProcess(short_tmp(), extra_config=tls_section(pki, port=tls_port,
                                                             require_client_cert=require_client_cert))
    node.tls_port = tls_port  # type: ignore[attr-defined]
    if not plain:
        node.config.write_text(node.config.read_text().replace(f"port = {node.port}\n", "port = 0\n", 1))
    nodes.append(node)
    return node.start()


@pytest.fixture
def tls_node(nodes, pki):
    """A node with TLS only (node.port = 0), client certificates required."""
    node = start_tls_node(nodes, pki, plain=False)
    yield node
    shutil.rmtree(node.workdir, ignore_errors=True)


def test_dcmtk_and_pynetdicom_clients_associate_over_tls(tls_node, pki, tmp_path):
    node = tls_node
    res = echoscu_tls(node.tls_port, pki, "ct01")
    assert res.returncode == 0, res.stdout + res.stderr
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "ct.dcm")
    store = subprocess.run(
        ["storescu", "-to", "5", "-ta", "5", "+tls", str(pki / "ct01.key"), str(pki / "ct01.pem"),
         "+cf", str(pki / "ca.pem"), "-aet", "CT01", "-aec", "AINODE", "127.0.0.1", str(node.tls_port),
         str(tmp_path / "ct.dcm")], capture_output=True, text=True, timeout=30, env=dcmtk_env())
    assert store.returncode == 0, store.stdout + store.stderr
    assert pynetdicom_store(node.tls_port, pki, "ct01") == (True, 0)
    assert len(node.stored_files()) == 2
    assert "(TLS, client CN=ct01,O=ainode tests)" in node.log_text()
    assert "TCP_NODELAY not set" not in node.log_text()  # set on the TLS connections' sockets too
    # the plain port is off: no process of the node listens on it (a connect could reach another test's
    # server that has since been given the same free port)
    import psutil

    root = psutil.Process(node.proc.pid)
    tree = [root] + root.children(recursive=True)
    listening = {c.laddr.port for p in tree for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    assert node.tls_port in listening and node.port not in listening
    accepted = [e for e in audit_events(node) if e["event_id"]["code"] == "110113" and e["outcome"] == 0]
    assert len(accepted) == 3
    assert accepted[0]["participants"][0]["tls_subject"] == "CN=ct01,O=ainode tests"
    assert accepted[0]["outcome_description"] == "association accepted (TLS)"


def test_plain_anonymous_and_untrusted_clients_are_refused(tls_node, pki):
    node = tls_node
    plain = subprocess.run(["echoscu", "-to", "5", "-ta", "5", "-td", "5", "-aec", "AINODE", "127.0.0.1",
                            str(node.tls_port)], capture_output=True, text=True, timeout=30, env=dcmtk_env())
    assert plain.returncode != 0
    assert echoscu_tls(node.tls_port, pki, "rogue").returncode != 0  # a certificate another CA signed
    assert echoscu_tls(node.tls_port, pki, None).returncode != 0  # no client certificate
    assert pynetdicom_store(node.tls_port, pki, None) == (False, None)
    assert pynetdicom_store(node.tls_port, pki, "rogue") == (False, None)
    assert echoscu_tls(node.tls_port, pki, "ct01").returncode == 0  # and the node is still fine

    def refusals() -> list[dict]:
        return [e for e in audit_events(node) if e["event_id"]["code"] == "110113" and e["outcome"] == 4]

    wait_until(lambda: len(refusals()) >= 5, 10, "five refused connections audited")
    reasons = [e["outcome_description"] for e in refusals()]
    assert all(r.startswith("connection refused: TLS handshake") for r in reasons)
    assert any("CERTIFICATE_VERIFY_FAILED" in r or "certificate verify failed" in r for r in reasons)
    assert all(e["event_type"][0]["code"] == "110126" for e in refusals())
    assert "Connection from 127.0.0.1" in node.log_text()


def test_silent_and_garbage_clients_block_no_one(tls_node, pki):
    node = tls_node
    silent = socket.create_connection(("127.0.0.1", node.tls_port))
    garbage = socket.create_connection(("127.0.0.1", node.tls_port))
    try:
        garbage.sendall(b"\x01\x00" + b"\xff" * 10)  # the start of something, never finished
        time.sleep(0.2)
        started = time.monotonic()
        res = echoscu_tls(node.tls_port, pki, "ct01")
        assert res.returncode == 0, res.stdout + res.stderr
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S / 2
        assert pynetdicom_store(node.tls_port, pki, "ct01") == (True, 0)
    finally:
        silent.close()
        garbage.close()


def test_silent_client_is_dropped_after_the_handshake_timeout(nodes, pki):
    node = start_tls_node(nodes, pki, plain=True, require_client_cert=False)
    tls_port = node.tls_port
    assert subprocess.run(["echoscu", "-to", "5", "-aec", "AINODE", "127.0.0.1", str(node.port)],
                          capture_output=True, env=dcmtk_env(), timeout=30).returncode == 0  # plain port too
    assert echoscu_tls(tls_port, pki, None).returncode == 0  # no client certificate needed here
    with socket.create_connection(("127.0.0.1", tls_port)) as silent:
        silent.settimeout(HANDSHAKE_TIMEOUT_S + 10)
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the node
        assert HANDSHAKE_TIMEOUT_S - 1 <= time.monotonic() - started <= HANDSHAKE_TIMEOUT_S + 5
    wait_until(lambda: "not completed within" in node.log_text(), 5, "the timeout logged")


# ------------------------------------------------------------------ send


def write_sr(directory: Path) -> Path:
    """A real TID 1500 SR (made by node.results.sr) about a small CT series."""
    import numpy as np

    from node.results.facts import KeyImage, ModelInfo, NodeDevice, Result, SourceImage
    from node.results.sr import build_sr
    from node.sample import write_ct_series

    vol = np.full((4, 32, 32), -700, np.int16)
    paths = write_ct_series(vol, (2.5, 0.7, 0.7), directory / "ct", patient_name="TLS^TEST", patient_id="T1")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    image = SourceImage(str(sources[1].SOPClassUID), str(sources[1].SOPInstanceUID), 1, 2)
    result = Result(str(sources[0].StudyInstanceUID), 1, str(sources[0].SeriesInstanceUID), 0.3, 0.5, (),
                    (KeyImage(image, 0.3),), ModelInfo("test", "1", "ab" * 32))
    sr = build_sr(result, sources, NodeDevice(uid="2.25.42"), series_uid=generate_uid(), sop_instance_uid=generate_uid())
    path = directory / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def storescp_tls(pki: Path, out: Path, cert: str = "pacs") -> tuple[subprocess.Popen[bytes], int]:
    """DCMTK storescp with +tls that requires a client certificate signed by ca."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", "-aet", "PACS", "+tls", str(pki / f"{cert}.key"), str(pki / f"{cert}.pem"),
         "+cf", str(pki / "ca.pem"), "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
    )

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"storescp exited with {proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 10, "storescp +tls")
    return proc, port


def test_sr_sent_over_tls_to_dcmtk_storescp(pki, tmp_path):
    from node.send import SendError, c_store

    sr = write_sr(tmp_path)
    proc, port = storescp_tls(pki, tmp_path / "pacs")
    tls = TLSConfig(cert=str(pki / "node.pem"), key=str(pki / "node.key"), ca=str(pki / "ca.pem"))
    try:
        for host in ("127.0.0.1", "localhost"):  # an IP and a DNS name, both named in the certificate
            delivery = c_store(sr, Destination("pacs", ae_title="PACS", host=host, port=port, tls=True), "AINODE", 10, tls)
            assert delivery.status == 0
        received = list((tmp_path / "pacs").iterdir())
        assert len(received) == 1  # the same SR twice: storescp names files by SOP Instance UID
        assert pydicom.dcmread(received[0]).SOPInstanceUID == pydicom.dcmread(sr).SOPInstanceUID
        with pytest.raises(SendError, match="TLS"):  # our client certificate is not trusted by... ourselves
            c_store(sr, Destination("pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=True), "AINODE", 5,
                    TLSConfig(cert=str(pki / "rogue.pem"), key=str(pki / "rogue.key"), ca=str(pki / "ca.pem")))
        with pytest.raises(SendError):  # a plain association to a TLS port
            c_store(sr, Destination("pacs", ae_title="PACS", host="127.0.0.1", port=port), "AINODE", 5, tls)
    finally:
        proc.kill()
        proc.wait(10)


def test_destination_certificate_is_checked(pki, tmp_path):
    from node.admin import echo
    from node.send import SendError, c_store

    sr = write_sr(tmp_path)
    proc, port = storescp_tls(pki, tmp_path / "pacs", cert="elsewhere")  # names pacs.example.org only
    tls = TLSConfig(cert=str(pki / "node.pem"), key=str(pki / "node.key"), ca=str(pki / "ca.pem"))
    dest = Destination("pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=True)
    try:
        with pytest.raises(SendError, match="certificate is not valid for '127.0.0.1'"):
            c_store(sr, dest, "AINODE", 5, tls)
        result = echo("AINODE", dest, 5, tls)
        assert not result.ok and "TLS handshake" in result.detail
        assert "certificate is not valid for '127.0.0.1'" in result.detail
        relaxed = TLSConfig(cert=tls.cert, key=tls.key, ca=tls.ca, check_hostname=False)
        assert c_store(sr, dest, "AINODE", 10, relaxed).status == 0  # trust then rests on the CA alone
        assert echo("AINODE", dest, 5, relaxed).ok
        untrusted = TLSConfig(cert=tls.cert, key=tls.key, ca=str(pki / "rogue-ca.pem"), check_hostname=False)
        with pytest.raises(SendError, match="certificate verify failed"):
            c_store(sr, dest, "AINODE", 5, untrusted)
    finally:
        proc.kill()
        proc.wait(10)


def test_contexts_are_tls12_or_later(pki):
    tls = TLSConfig(enabled=True, cert=str(pki / "node.pem"), key=str(pki / "node.key"), ca=str(pki / "ca.pem"),
                    require_client_cert=True)
    server, client = server_context(tls), client_context(tls)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED and client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


def test_sighup_swaps_the_certificate_and_audits_the_reload(nodes, pki):
    node = start_tls_node(nodes, pki, plain=False)

    def served_cn() -> str:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "ct01.pem"), str(pki / "ct01.key"))
        with socket.create_connection(("127.0.0.1", node.tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]

    assert served_cn() == "node"
    text = node.config.read_text()
    node.config.write_text(text.replace(str(pki / "node."), str(pki / "pacs.")))
    node.signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in node.log_text(), 10, "the reload")
    assert served_cn() == "pacs"  # new connections get the new certificate, no restart
    node.config.write_text(text.replace(f'key = "{pki / "node.key"}"', f'key = "{pki / "ct01.key"}"'))
    node.signal(signal.SIGHUP)  # a key that does not match: refused, the running certificate kept
    wait_until(lambda: "config not reloaded" in node.log_text(), 10, "the refused reload")
    assert served_cn() == "pacs"
    reloads = [e for e in audit_events(node) if e["event_type"][0]["code"] in ("110129", "110131")]
    assert [(e["event_type"][0]["code"], e["outcome"]) for e in reloads] == [("110129", 0), ("110129", 8)]
    assert "does not load with cert" in reloads[1]["outcome_description"]
    assert "PRIVATE KEY" not in node.log_text() + json.dumps(reloads)


def test_the_web_page_over_https_with_the_nodes_certificate(pki, tmp_path):
    """[web] tls = true: the page and its probes are HTTPS with [tls] cert/key; plain HTTP gets nothing."""
    import ssl
    import sys
    import urllib.request

    from tests.peers import stop_process, write_config

    web_port = free_port()
    cfg = write_config(tmp_path / "ainode.toml", port=free_port(), storage=short_tmp() / "storage", web_port=web_port,
                       extra=tls_section(pki, port=free_port()))
    cfg.write_text(cfg.read_text().replace("[web]\nenabled = true", "[web]\ntls = true\nenabled = true"))
    proc = subprocess.Popen([sys.executable, "-m", "node", "--config", str(cfg), "web"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))

        def https_ok() -> bool:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{web_port}/healthz", context=trusted, timeout=3) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(https_ok, 30, "the page over HTTPS")
        with pytest.raises(OSError):  # plain HTTP to the HTTPS port
            urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=3).read()
    finally:
        stop_process(proc)
