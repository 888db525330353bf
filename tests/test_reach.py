"""Several called AE titles, each a pipeline; results by C-STORE, STOW-RS and HL7; store and forward.

One ainode with three pipelines, against real peers on 127.0.0.1:

- ``AI_LUNG`` (callers CT01, CT02): analysed, results to a DCMTK ``storescp`` (the PACS) and to
  an HL7 listener (hl7apy's MLLPServer, the RIS);
- ``AI_RESEARCH`` (caller RSRCH, its own model and threshold): analysed, results only to Orthanc by STOW-RS
  (its DICOMweb plugin, basic auth);
- ``FORWARD`` (model "none"): store and forward to a second ``storescp``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.peers import (DICOMWEB_PLUGIN, DicomWebOrthanc, NodeProcess, dcmtk_env, echoscu, free_port, have,
                         scu_store, short_tmp, stop_process, storescu, wait_until)
from tests.test_hl7 import ORU, Answer, mllp_server

pytestmark = pytest.mark.skipif(
    not (have("storescu") and have("storescp") and have("Orthanc") and DICOMWEB_PLUGIN.is_file()),
    reason="needs DCMTK and Orthanc with its DICOMweb plugin (apt-get install dcmtk orthanc orthanc-dicomweb)",
)


def restudied(files: list[Path], folder: Path, accession: str) -> list[Path]:
    """Copies of a series as a study of its own (new Study, Series and SOP Instance UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.AccessionNumber = study, series, accession
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


class StoreSCP:
    """DCMTK storescp writing what it receives into a folder, as it came (same transfer syntax)."""

    def __init__(self, folder: Path, aet: str, accept_all: bool = False) -> None:
        self.folder, self.aet, self.port = folder, aet, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        every = ["+xa"] if accept_all else []  # +xa: every transfer syntax it supports (default: uncompressed only)
        self.proc = subprocess.Popen(["storescp", *every, "-aet", aet, "-od", str(folder), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env())

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir())]

    def stop(self) -> None:
        stop_process(self.proc)


def outcome(node: NodeProcess, study: str, revision: int = 1) -> dict | None:
    path = node.storage / "state" / study / f"rev-{revision:04d}.outcome.json"
    return json.loads(path.read_text()) if path.exists() else None


def send_state(node: NodeProcess, study: str, dest: str, revision: int = 1) -> dict:
    path = node.storage / "state" / study / f"rev-{revision:04d}.send-{dest}.json"
    return json.loads(path.read_text()) if path.exists() else {}


PIPELINES = """
[[pipelines]]
ae_title = "AI_LUNG"
callers = ["CT01", "CT02"]
destinations = ["pacs", "ris"]
threshold = 0.0
[[pipelines]]
ae_title = "AI_RESEARCH"
callers = ["RSRCH"]
model = "{research_model}"
destinations = ["archive"]
threshold = 1.0
quiet_seconds = 1.5
[[pipelines]]
ae_title = "FORWARD"
model = "none"
destinations = ["fwd"]
"""


@pytest.fixture(scope="module")
def site(test_model: Path) -> Iterator[dict[str, Any]]:
    """The peers and the node, for the whole module."""
    from node.testmodel import build_test_model

    work = short_tmp("reach-")
    research_model = work / "research-model.onnx"
    build_test_model(research_model, size=64, context=1, seed=7, name="ainode-research-cnn")
    pacs, fwd = StoreSCP(work / "pacs", "PACS"), StoreSCP(work / "fwd", "FWD", accept_all=True)
    orthanc = DicomWebOrthanc(work / "orthanc", users={"ainode": "s3cret"}).start()
    token = work / "archive.auth"
    token.write_text("ainode:s3cret\n")
    received: list[str] = []
    answer = ["AA", "", None]  # what the RIS answers: a test may change it
    with mllp_server(Answer, received, answer) as ris_port:
        extra = (
            f'[model]\npath = "{test_model}"\ndevice = "cpu"\n'
            "[send]\nretry_hours = 0.001\nretry_first_seconds = 1\ntimeout_seconds = 5\n"
            + "".join(f'[[callers]]\nae_title = "{ae}"\n' for ae in ("CT01", "CT02", "RSRCH", "PYSCU"))
            + f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            f'[[destinations]]\nname = "ris"\nkind = "hl7"\nhost = "127.0.0.1"\nport = {ris_port}\n'
            f'application = "RIS"\nfacility = "RADIOLOGY"\n'
            f'[[destinations]]\nname = "archive"\nkind = "dicomweb"\nurl = "{orthanc.dicomweb_url}"\n'
            f'auth_file = "{token}"\n'
            f'[[destinations]]\nname = "fwd"\nae_title = "FWD"\nhost = "127.0.0.1"\nport = {fwd.port}\n'
            + PIPELINES.replace("{research_model}", str(research_model))
        )
        (work / "node").mkdir()
        node = NodeProcess(work / "node", quiet=1.0, workers=1, extra_config=extra)
        try:
            node.start()
            yield {"node": node, "pacs": pacs, "fwd": fwd, "orthanc": orthanc, "ris": received, "work": work,
                   "token": token, "ris_answer": answer}
        finally:
            node.stop()
            pacs.stop()
            fwd.stop()
            orthanc.stop()


def test_each_called_ae_title_runs_its_own_pipeline(site, lung1_series):
    node, pacs, orthanc, ris = site["node"], site["pacs"], site["orthanc"], site["ris"]
    lung = restudied(lung1_series[:20], site["work"] / "lung", "ACC-LUNG-1")
    research = restudied(lung1_series[:20], site["work"] / "research", "ACC-RES-1")
    lung_study = str(pydicom.dcmread(lung[0]).StudyInstanceUID)
    research_study = str(pydicom.dcmread(research[0]).StudyInstanceUID)
    assert storescu(lung, node.port, called="AI_LUNG", calling="CT01").returncode == 0
    assert storescu(research, node.port, called="AI_RESEARCH", calling="RSRCH").returncode == 0

    # AI_LUNG: analysed with its threshold (0: positive), to the PACS by C-STORE and to the RIS by HL7
    wait_until(lambda: send_state(node, lung_study, "pacs").get("status") == "sent", 90, "the PACS delivery")
    wait_until(lambda: send_state(node, lung_study, "ris").get("status") == "sent", 30, "the RIS delivery")
    lung_outcome = outcome(node, lung_study)
    assert lung_outcome["pipeline"] == "AI_LUNG" and lung_outcome["result"]["threshold"] == 0.0
    at_pacs = pacs.received()
    assert {ds.StudyInstanceUID for ds in at_pacs} == {lung_study}  # the research study never goes there
    assert sorted(ds.Modality for ds in at_pacs) == ["KO", "OT", "SR"]
    sr = next(ds for ds in at_pacs if ds.Modality == "SR")
    assert "pipeline=AI_LUNG" in str(sr)  # the SR names its pipeline (TID 4019 algorithm parameter)

    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    (message,) = [m for m in ris if "ACC-LUNG-1" in m]
    oru = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert oru.validate() and oru.msh.msh_9.to_er7() == ORU and oru.msh.msh_12.to_er7() == "2.5.1"
    assert oru.msh.msh_5.to_er7() == "RIS" and oru.msh.msh_6.to_er7() == "RADIOLOGY"
    segments = message.split("\r")
    obx = [s.split("|") for s in segments if s.startswith("OBX|")]
    probability = next(f for f in obx if "AINODE-PROB" in f[3])
    assert float(probability[5]) == pytest.approx(lung_outcome["result"]["score"], abs=0.0005)
    assert probability[8] == "A" and probability[11] == "P"  # abnormal (positive), preliminary
    assert any(sr.SOPInstanceUID in f[5] for f in obx) and "demo model, not for clinical use" in message
    assert not any("ACC-RES-1" in m for m in ris)

    # AI_RESEARCH: its threshold (1: negative), only to Orthanc by STOW-RS, into the source study
    wait_until(lambda: send_state(node, research_study, "archive").get("status") == "sent", 90, "the STOW-RS")
    research_outcome = outcome(node, research_study)
    assert research_outcome["pipeline"] == "AI_RESEARCH" and research_outcome["result"]["threshold"] == 1.0
    models = {o["result"]["model"]["name"] for o in (lung_outcome, research_outcome)}
    assert models == {"ainode-test-cnn", "ainode-research-cnn"}  # each pipeline ran its own model
    arrived = orthanc.instances_of_study(research_study)
    assert sorted(i["Modality"] for i in arrived) == ["KO", "OT", "SR"]
    assert orthanc.instances_of_study(lung_study) == []
    assert not (node.storage / "state" / research_study / "rev-0001.send-pacs.json").exists()
    assert site["fwd"].received() == []  # no analysed study is forwarded

    listed = subprocess.run([sys.executable, "-m", "node", "--config", str(node.config), "results", "list"],
                            capture_output=True, text=True, check=True).stdout
    assert f"{lung_study}  r1" in listed and "via AI_LUNG" in listed and "via AI_RESEARCH" in listed
    trail = (node.storage / "audit.jsonl").read_text()
    assert "analysis started (pipeline AI_RESEARCH)" in trail and "as HL7 ORU^R01" in trail and "by STOW-RS" in trail


def test_unknown_called_ae_and_a_caller_of_another_pipeline_are_rejected(site):
    node = site["node"]
    assert echoscu(node.port, called="AI_LUNG", calling="CT02").returncode == 0
    nope = echoscu(node.port, called="NOPE", calling="CT01")
    assert nope.returncode != 0 and "Called AE Title Not Recognized" in nope.stdout + nope.stderr
    other = echoscu(node.port, called="AI_LUNG", calling="RSRCH")  # an allowed caller, not of this pipeline
    assert other.returncode != 0 and "Calling AE Title Not Recognized" in other.stdout + other.stderr
    log = node.log_text()
    assert "called AE title 'NOPE' is not one of 'AI_LUNG', 'AI_RESEARCH', 'FORWARD'" in log
    assert "calling AE title 'RSRCH' may not call 'AI_LUNG'" in log


def test_store_and_forward_sends_each_instance_as_it_came(site):
    node, fwd = site["node"], site["fwd"]
    jpeg = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")  # JPEG lossless, encapsulated: must not be transcoded
    ct = get_testdata_file("CT_small.dcm")
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in (jpeg, ct)}
    assert scu_store(node.port, [Path(jpeg), Path(ct)], calling="PYSCU", called="FORWARD") == [0, 0]
    wait_until(lambda: len(fwd.received()) == 2, 60, "both instances at the forward destination")
    for ds in fwd.received():
        source = sources[str(ds.SOPInstanceUID)]
        assert ds.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert ds.PixelData == source.PixelData  # byte-identical
    for study in {str(ds.StudyInstanceUID) for ds in sources.values()}:
        assert outcome(node, study)["status"] == "forwarded"
        assert not (node.storage / "results" / study).exists()  # nothing analysed, nothing made


def resend(node: NodeProcess, study: str, dest: str) -> None:
    from node.cli import main

    assert main(["--config", str(node.config), "results", "resend", study, "--dest", dest]) == 0


def test_stow_with_wrong_credentials_is_retried_then_dead_then_resent(site, lung1_series):
    node, orthanc, token = site["node"], site["orthanc"], site["token"]
    files = restudied(lung1_series[:12], site["work"] / "creds", "ACC-CREDS")
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    token.write_text("ainode:wrong-password\n")
    try:
        assert storescu(files, node.port, called="AI_RESEARCH", calling="RSRCH").returncode == 0
        wait_until(lambda: send_state(node, study, "archive").get("status") == "dead", 90, "the dead letter")
    finally:
        token.write_text("ainode:s3cret\n")
    dead = send_state(node, study, "archive")
    assert dead["attempts"] >= 2 and "401" in dead["last_error"]
    assert "wrong-password" not in node.log_text() and "wrong-password" not in json.dumps(dead)
    assert orthanc.instances_of_study(study) == []
    resend(node, study, "archive")
    wait_until(lambda: send_state(node, study, "archive").get("status") == "sent", 60, "the resend")
    assert sorted(i["Modality"] for i in orthanc.instances_of_study(study)) == ["KO", "OT", "SR"]


def test_stow_to_an_archive_that_is_down_is_retried_then_dead_then_resent(site, lung1_series):
    node, orthanc = site["node"], site["orthanc"]
    files = restudied(lung1_series[:12], site["work"] / "down", "ACC-DOWN")
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    orthanc.stop()
    try:
        assert storescu(files, node.port, called="AI_RESEARCH", calling="RSRCH").returncode == 0
        wait_until(lambda: send_state(node, study, "archive").get("status") == "dead", 90, "the dead letter")
    finally:
        orthanc.start()  # same ports and database
    dead = send_state(node, study, "archive")
    assert dead["attempts"] >= 2 and "connection refused" in dead["last_error"]
    resend(node, study, "archive")
    wait_until(lambda: send_state(node, study, "archive").get("status") == "sent", 60, "the resend")
    assert sorted(i["Modality"] for i in orthanc.instances_of_study(study)) == ["KO", "OT", "SR"]


def test_an_hl7_refusal_is_recorded_retried_then_resent(site, lung1_series):
    node, answer, received = site["node"], site["ris_answer"], site["ris"]
    files = restudied(lung1_series[:12], site["work"] / "ar", "ACC-AR")
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    answer[:] = ["AR", "unknown order ACC-AR", None]
    try:
        assert storescu(files, node.port, called="AI_LUNG", calling="CT02").returncode == 0
        wait_until(lambda: send_state(node, study, "ris").get("status") == "dead", 90, "the RIS refusal dead-lettered")
    finally:
        answer[:] = ["AA", "", None]
    dead = send_state(node, study, "ris")
    assert dead["attempts"] >= 2 and "AR" in dead["last_error"] and "unknown order ACC-AR" in dead["last_error"]
    assert send_state(node, study, "pacs")["status"] == "sent"  # the PACS delivery goes its own way
    tries = sum("ACC-AR" in m for m in received)
    resend(node, study, "ris")
    wait_until(lambda: send_state(node, study, "ris").get("status") == "sent", 30, "the resent ORU")
    assert sum("ACC-AR" in m for m in received) == tries + 1


def test_sighup_adds_a_pipeline_without_dropping_an_open_association(site, lung1_series):
    from pynetdicom import AE

    node = site["node"]
    files = restudied(lung1_series[:12], site["work"] / "hup", "ACC-HUP")
    ae = AE(ae_title="CT01")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(pydicom.dcmread(files[0]).SOPClassUID, pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AI_LUNG")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files[:6]]
        assert echoscu(node.port, called="NEWAE", calling="CT01").returncode != 0
        text = node.config.read_text()
        node.config.write_text(text + '[[pipelines]]\nae_title = "NEWAE"\ndestinations = ["pacs"]\n')
        before = node.log_text().count("SIGHUP: config reloaded")
        node.signal(signal.SIGHUP)
        wait_until(lambda: node.log_text().count("SIGHUP: config reloaded") > before, 20, "the reload")
        statuses += [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files[6:]]
        assert assoc.is_established
    finally:
        assoc.release()
    assert statuses == [0] * 12
    assert echoscu(node.port, called="NEWAE", calling="CT01").returncode == 0
    assert "4 pipelines (AI_LUNG, AI_RESEARCH, FORWARD, NEWAE)" in node.log_text()
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    wait_until(lambda: (outcome(node, study) or {}).get("pipeline") == "AI_LUNG", 60, "the study in AI_LUNG")


def test_a_compressed_file_is_never_transcoded_for_a_peer_that_refuses_its_syntax(tmp_path):
    from node.config import Destination
    from node.send import SendError, c_store

    scp = StoreSCP(tmp_path / "scp", "PLAIN")  # storescp's default: uncompressed transfer syntaxes only
    try:
        wait_until(lambda: echoscu(scp.port, called="PLAIN").returncode == 0, 10, "storescp")
        dest = Destination("plain", ae_title="PLAIN", host="127.0.0.1", port=scp.port)
        with pytest.raises(SendError) as refused:
            c_store([Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))], dest, "AINODE", 5)
        assert "accepts none of the presentation contexts proposed" in str(refused.value)
        assert "1.2.840.10008.1.2.4.70 (transfer syntaxes not supported)" in str(refused.value)
        ct = Path(get_testdata_file("CT_small.dcm"))
        assert c_store([ct], dest, "AINODE", 5).statuses == (0,)
        assert pydicom.dcmread(next((tmp_path / "scp").iterdir())).PixelData == pydicom.dcmread(ct).PixelData
    finally:
        scp.stop()


def test_dest_echo_reaches_each_kind(site, capsys):
    from node.cli import main

    cfg = ["--config", str(site["node"].config)]
    assert main([*cfg, "dest", "echo", "archive"]) == 0
    assert "QIDO-RS answered 200" in capsys.readouterr().out
    assert main([*cfg, "dest", "echo", "ris"]) == 0
    assert "connected (no message sent" in capsys.readouterr().out
    site["token"].write_text("ainode:not-it\n")
    try:
        assert main([*cfg, "dest", "echo", "archive"]) == 1
    finally:
        site["token"].write_text("ainode:s3cret\n")
    err = capsys.readouterr().err
    assert "401" in err and "not-it" not in err
