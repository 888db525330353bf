"""STOW-RS (node.send.dicomweb) into a real Orthanc with its DICOMweb plugin, on loopback.

Orthanc 1.10.1's own HTTPS crashes on the first TLS connection here (segfault), so the
HTTPS tests put socat's TLS in front of the same Orthanc. Answers Orthanc cannot be made
to give (a bearer-token check, a FailedSOPSequence, a warning) come from a tiny local
http.server that records what it was sent.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import time
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from node.config import Destination
from node.send import dicomweb
from node.send.delivery import SendError
from node.send.dicomweb import credentials_problem, stow
from tests.peers import DICOMWEB_PLUGIN, DicomWebOrthanc, ct_small, free_port, have, serving, stop_process, wait_until

PASSWORD = "s3cret-Pa55"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

pytestmark = pytest.mark.skipif(not (have("Orthanc") and DICOMWEB_PLUGIN.is_file()),
                                reason="Orthanc and its DICOMweb plugin (orthanc-dicomweb) are not installed")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomWebOrthanc]:
    with DicomWebOrthanc(tmp_path_factory.mktemp("pacs"), users={"ainode": PASSWORD}) as server:
        yield server


def destination(url: str, auth_file: Path | str = "", ca: Path | str = "") -> Destination:
    return Destination(name="web-pacs", kind="dicomweb", url=url, auth_file=str(auth_file), ca=str(ca))


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def ct_files(folder: Path, count: int, study_uid: str | None = None) -> list[Path]:
    """``count`` CT_small copies in one new study (one series), as Part 10 files."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    out = []
    for i in range(count):
        ds = ct_small(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, InstanceNumber=i + 1)
        out.append(folder / f"ct{i}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def text_sr(ct: Dataset) -> Dataset:
    """A minimal Comprehensive SR in the CT's study: one TEXT finding under the root container."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID(COMPREHENSIVE_SR)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, key, ct.get(key, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "SR", generate_uid(), 900, 1
    ds.Manufacturer, ds.ContentDate, ds.ContentTime = "ainode tests", "20240101", "120000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = DicomSequence([code("126000", "Imaging Measurement Report")])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.PerformedProcedureCodeSequence = DicomSequence()
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "No nodule found."
    item.ConceptNameCodeSequence = DicomSequence([code("121071", "Finding")])
    ds.ContentSequence = DicomSequence([item])
    return ds


def code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def arrived(pacs: DicomWebOrthanc, study_uid: str) -> dict[str, dict[str, Any]]:
    """SOP Instance UID -> simplified tags (and Orthanc ``_id``) of the study's instances in Orthanc."""
    return {tags["SOPInstanceUID"]: tags for tags in pacs.instances_of_study(study_uid)}


# --------------------------------------------------------------------------- into Orthanc


def test_ct_and_sr_arrive_in_their_study_with_basic_auth(pacs: DicomWebOrthanc, tmp_path: Path) -> None:
    [ct_path] = ct_files(tmp_path, 1)
    ct = pydicom.dcmread(ct_path)
    sr_path = tmp_path / "sr.dcm"
    text_sr(ct).save_as(sr_path, enforce_file_format=True)
    auth = secret_file(tmp_path / "auth", f"ainode:{PASSWORD}\n")

    delivery = stow([sr_path, ct_path], destination(pacs.dicomweb_url, auth), timeout=10)

    assert delivery.statuses == (0, 0) and delivery.status == 0
    found = arrived(pacs, ct.StudyInstanceUID)
    sr = pydicom.dcmread(sr_path)
    assert set(found) == {ct.SOPInstanceUID, sr.SOPInstanceUID}
    assert found[sr.SOPInstanceUID]["Modality"] == "SR"
    assert found[sr.SOPInstanceUID]["SOPClassUID"] == COMPREHENSIVE_SR
    assert found[ct.SOPInstanceUID]["SeriesInstanceUID"] == ct.SeriesInstanceUID


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_encapsulated_pixel_data_arrives_unchanged(pacs: DicomWebOrthanc, tmp_path: Path, name: str) -> None:
    source = Path(str(get_testdata_file(name)))
    original = pydicom.dcmread(source)
    assert original.file_meta.TransferSyntaxUID.is_compressed
    auth = secret_file(tmp_path / "auth", f"ainode:{PASSWORD}")

    assert stow([source], destination(pacs.dicomweb_url, auth), timeout=10).statuses == (0,)

    found = arrived(pacs, original.StudyInstanceUID)[original.SOPInstanceUID]
    stored = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{found['_id']}/file")))
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored["PixelData"].is_undefined_length
    assert stored.PixelData == original.PixelData  # the encapsulated fragments, byte for byte


def test_wrong_password_is_a_401_without_the_secret(pacs: DicomWebOrthanc, tmp_path: Path) -> None:
    files = ct_files(tmp_path, 1)
    auth = secret_file(tmp_path / "auth", "ainode:not-the-Pa55word")

    with pytest.raises(SendError) as info:
        stow(files, destination(pacs.dicomweb_url, auth), timeout=10)

    message = str(info.value)
    assert "401 Unauthorized" in message and "web-pacs" in message and pacs.dicomweb_url in message
    assert "not-the-Pa55word" not in message and PASSWORD not in message
    assert not arrived(pacs, pydicom.dcmread(files[0]).StudyInstanceUID)


@pytest.mark.parametrize("limits, requests", [((2, 10**9), 3), ((100, "1.5 files"), 5)])
def test_batches_go_in_several_requests_and_all_arrive(pacs: DicomWebOrthanc, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, limits: tuple,
                                                        requests: int) -> None:
    files = ct_files(tmp_path, 5)
    count, size = limits
    if size == "1.5 files":
        size = int(files[0].stat().st_size * 1.5)
    monkeypatch.setattr(dicomweb, "MAX_BATCH_INSTANCES", count)
    monkeypatch.setattr(dicomweb, "MAX_BATCH_BYTES", size)
    posts: list[str] = []
    original = dicomweb._StowSession.request

    def counting(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        posts.append(f"{method} {url}")
        return original(self, method, url, *args, **kwargs)

    monkeypatch.setattr(dicomweb._StowSession, "request", counting)
    auth = secret_file(tmp_path / "auth", f"ainode:{PASSWORD}")

    delivery = stow(files, destination(pacs.dicomweb_url, auth), timeout=10)

    assert delivery.statuses == (0,) * 5
    assert posts == [f"POST {pacs.dicomweb_url}/studies"] * requests
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert set(arrived(pacs, study)) == {pydicom.dcmread(f).SOPInstanceUID for f in files}


def test_batches_keep_order_and_put_a_large_file_alone(tmp_path: Path) -> None:
    sizes = [10, 10, 50, 10, 10, 10]
    files = []
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"x" * n)
    groups = dicomweb.batches(files, max_bytes=30, max_count=2)
    assert [[f.name for f in g] for g in groups] == [["f0", "f1"], ["f2"], ["f3", "f4"], ["f5"]]


# --------------------------------------------------------------------------- credentials


def test_missing_auth_file_is_a_credentials_problem(pacs: DicomWebOrthanc, tmp_path: Path) -> None:
    dest = destination(pacs.dicomweb_url, tmp_path / "no-such-auth")
    problem = credentials_problem(dest)
    assert problem is not None and "does not exist" in problem and str(tmp_path / "no-such-auth") in problem
    with pytest.raises(SendError, match="does not exist"):
        stow(ct_files(tmp_path, 1), dest, timeout=10)


@pytest.mark.parametrize("text, expected", [("", "is empty"), ("\n  \n", "is empty"),
                                            (f"ainode:{PASSWORD}\nsecond-{PASSWORD}\n", "holds 2 lines"),
                                            (f":{PASSWORD}", "user name"), (f"tok {PASSWORD}", "bearer token")])
def test_unusable_auth_files_are_named_without_the_secret(tmp_path: Path, text: str, expected: str) -> None:
    problem = credentials_problem(destination("http://127.0.0.1:1/dicom-web", secret_file(tmp_path / "a", text)))
    assert problem is not None and expected in problem and PASSWORD not in problem


def test_auth_file_problems_without_a_file(tmp_path: Path) -> None:
    assert credentials_problem(destination("http://127.0.0.1:1/dicom-web")) is None  # no auth
    problem = credentials_problem(destination("http://127.0.0.1:1/dicom-web", tmp_path))
    assert problem is not None and "is not a file" in problem


def test_a_world_readable_auth_file_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = secret_file(tmp_path / "auth", f"ainode:{PASSWORD}\n", mode=0o644)
    with caplog.at_level("WARNING", logger="node.send.dicomweb"):
        assert credentials_problem(destination("http://127.0.0.1:1/dicom-web", auth)) is None
    assert "644" in caplog.text and str(auth) in caplog.text and PASSWORD not in caplog.text


# --------------------------------------------------------------------------- no peer, or a scripted one


def test_nothing_listening_fails_quickly_naming_the_destination(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    started = time.monotonic()
    with pytest.raises(SendError) as info:
        stow(ct_files(tmp_path, 1), destination(url), timeout=10)
    assert time.monotonic() - started < 3
    assert str(info.value) == f"web-pacs ({url}): STOW-RS failed: connection refused"


def test_a_peer_that_never_answers_times_out(tmp_path: Path) -> None:
    with closing(socket.socket()) as listener:  # connections complete in the kernel; nobody reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        started = time.monotonic()
        with pytest.raises(SendError, match=r"web-pacs .*: STOW-RS failed: (no answer within|timed out after) 1 s"):
            stow(ct_files(tmp_path, 1), destination(url), timeout=1)
        assert time.monotonic() - started < 5


class Scripted(ThreadingHTTPServer):
    """An HTTP server on a free loopback port answering every POST with ``answer`` (status, headers, body);
    ``seen`` gets (path, headers, body length) of each."""

    def __init__(self, answer: tuple[int, dict[str, str], bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.answer = answer
        self.seen: list[tuple[str, dict[str, str], int]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: Scripted

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.path, dict(self.headers), len(body)))
        status, headers, payload = self.server.answer
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(payload))}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def scripted(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Iterator[Scripted]:
    with serving(Scripted((status, headers or {}, body))) as server:
        yield server


def stow_answer(stored: dict[str, int | None], failed: dict[str, int] | None = None) -> bytes:
    """A STOW-RS response dataset as DICOM JSON: stored UID -> WarningReason (None: none), failed UID -> reason."""
    answer = Dataset()
    answer.ReferencedSOPSequence = DicomSequence()
    for uid, warning in stored.items():
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uid
        if warning is not None:
            item.WarningReason = warning
        answer.ReferencedSOPSequence.append(item)
    answer.FailedSOPSequence = DicomSequence()
    for uid, reason in (failed or {}).items():
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uid
        item.FailureReason = reason
        answer.FailedSOPSequence.append(item)
    return json.dumps(answer.to_json_dict()).encode()


def test_a_bearer_token_is_sent_and_kept_out_of_the_error(tmp_path: Path) -> None:
    token = "eyJhbGciOi.tok-" + generate_uid()[-12:]
    auth = secret_file(tmp_path / "token", token + "\n")
    with scripted(401, headers={"WWW-Authenticate": "Bearer"}) as server:
        with pytest.raises(SendError) as info:
            stow(ct_files(tmp_path, 1), destination(server.url, auth), timeout=5)
    [(path, headers, length)] = server.seen
    assert path == "/dicom-web/studies" and length > 30000
    assert headers["Authorization"] == f"Bearer {token}"
    assert headers["Host"] == f"127.0.0.1:{server.server_address[1]}"  # with its port (dicomweb-client drops it)
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert "401 Unauthorized" in str(info.value) and token not in str(info.value)


def test_failed_instances_are_listed_with_their_reasons(tmp_path: Path) -> None:
    files = ct_files(tmp_path, 2)
    good, bad = (str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    body = stow_answer(stored={good: None}, failed={bad: 0x0110})
    with scripted(409, body) as server:  # no Content-Type, as Orthanc answers its errors
        with pytest.raises(SendError) as info:
            stow(files, destination(server.url), timeout=5)
    assert str(info.value) == (f"web-pacs ({server.url}): STOW-RS answered 409 Conflict; "
                               f"1 of 2 failed: {bad} (0x0110 processing failure)")


def test_warnings_become_statuses_and_unacknowledged_instances_fail(tmp_path: Path) -> None:
    files = ct_files(tmp_path, 2)
    first, second = (str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    json_type = {"Content-Type": "application/dicom+json"}
    with scripted(202, stow_answer(stored={first: 0xB007, second: None}), json_type) as server:
        assert stow(files, destination(server.url), timeout=5).statuses == (0xB007, 0)
    with scripted(202, stow_answer(stored={first: None}, failed={second: 0xA700}), json_type) as server:
        with pytest.raises(SendError, match=rf"202 Accepted; 1 of 2 failed: {second} \(0xA700 out of resources\)$"):
            stow(files, destination(server.url), timeout=5)
    with scripted(200, stow_answer(stored={first: None}), json_type) as server:
        with pytest.raises(SendError, match=f"1 of 2 not in the answer: {second}$"):
            stow(files, destination(server.url), timeout=5)
    with scripted(200, b"<html>proxy login</html>", {"Content-Type": "text/html"}) as server:
        with pytest.raises(SendError, match="answered 200 OK without a DICOM JSON response"):
            stow(files, destination(server.url), timeout=5)


# --------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def https_pacs(pacs: DicomWebOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(DICOMweb URL over HTTPS, its self-signed certificate): socat's TLS in front of ``pacs``."""
    if not (have("socat") and have("openssl")):
        pytest.skip("socat and openssl are needed for the HTTPS tests")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    port = free_port()
    proc = subprocess.Popen(
        ["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={key},verify=0",
         f"TCP:127.0.0.1:{pacs.http_port}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"socat exited with {proc.returncode}")
        with closing(socket.socket()) as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 10, f"socat TLS on port {port}")
        yield f"https://127.0.0.1:{port}/dicom-web", cert
    finally:
        stop_process(proc, timeout=5)


def test_https_with_the_destination_ca(pacs: DicomWebOrthanc, https_pacs: tuple[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import certifi

    url, cert = https_pacs
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # must not replace the destination's ca
    files = ct_files(tmp_path, 1)
    auth = secret_file(tmp_path / "auth", f"ainode:{PASSWORD}")

    assert stow(files, destination(url, auth, ca=cert), timeout=10).statuses == (0,)
    ds = pydicom.dcmread(files[0])
    assert set(arrived(pacs, ds.StudyInstanceUID)) == {ds.SOPInstanceUID}


def test_https_without_the_ca_fails_verification(pacs: DicomWebOrthanc, https_pacs: tuple[str, Path],
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    url, _ = https_pacs
    files = ct_files(tmp_path, 1)
    auth = secret_file(tmp_path / "auth", f"ainode:{PASSWORD}")

    with pytest.raises(SendError) as info:
        stow(files, destination(url, auth), timeout=10)

    reason = "TLS certificate verify failed: self-signed certificate"
    assert str(info.value) == f"web-pacs ({url}): STOW-RS failed: {reason}"
    assert not arrived(pacs, pydicom.dcmread(files[0]).StudyInstanceUID)
