"""End to end: storescu -> ainode (SCP + worker + sender) -> SR -> Orthanc as the PACS.

The model is a small real ONNX graph (node.testmodel) run by a real ONNX Runtime
session; the PACS is a real Orthanc; the SRs are checked with dciodvfy, dsrdump
and highdicom.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from tests.peers import NodeProcess, dcmtk_env, scu_store, free_port, have, short_tmp, storescu, wait_until

pytestmark = pytest.mark.skipif(
    not (have("storescu") and have("Orthanc")), reason="needs DCMTK and Orthanc (apt-get install dcmtk orthanc)"
)




def node_with(nodes, model: Path, dest_port: int, dest_ae: str = "ORTHANC", quiet: float = 1.0,
              retry_hours: float = 1.0) -> NodeProcess:
    extra = (
        f'[model]\npath = "{model}"\ndevice = "cpu"\nthreshold = 0.5\n'
        f"[send]\nretry_hours = {retry_hours}\nretry_first_seconds = 1\ntimeout_seconds = 5\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "{dest_ae}"\nhost = "127.0.0.1"\nport = {dest_port}\n'
    )
    node = NodeProcess(short_tmp(), quiet=quiet, workers=1, extra_config=extra)
    nodes.append(node)
    return node.start()


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def outcome(node: NodeProcess, study: str, revision: int = 1) -> dict | None:
    path = node.storage / "state" / study / f"rev-{revision:04d}.outcome.json"
    return json.loads(path.read_text()) if path.exists() else None


def send_state(node: NodeProcess, study: str, revision: int = 1) -> dict | None:
    path = node.storage / "state" / study / f"rev-{revision:04d}.send-pacs.json"
    return json.loads(path.read_text()) if path.exists() else None


def results_list(node: NodeProcess) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(node.config), "results", "list", "--json"],
        capture_output=True, text=True, check=True, cwd=node.workdir,
    )
    return json.loads(out.stdout)


def test_lung1_to_orthanc_sr_in_same_study(nodes, pacs, lung1_series, test_model):
    node = node_with(nodes, test_model, pacs.port)
    assert storescu(lung1_series, node.port).returncode == 0
    study = study_of(lung1_series[0])
    srs = wait_until(lambda: pacs.instances_of_study(study, "SR"), 90, "the SR in Orthanc")
    assert len(srs) == 1
    made = {pydicom.dcmread(p, stop_before_pixels=True).Modality: p
            for p in (node.storage / "results" / study).glob("*.dcm")}
    assert sorted(made) == ["KO", "OT", "SR"]  # the SR, the summary image, the key objects
    sr_files = [made["SR"]]
    sr = pydicom.dcmread(sr_files[0])
    # every PACS gets the summary image and the key objects too, in the same study, each in its own series
    for modality in ("OT", "KO"):
        (arrived,) = wait_until(lambda: pacs.instances_of_study(study, modality), 30, f"the {modality} in Orthanc")
        assert arrived["SOPInstanceUID"] == made[modality].stem
    assert sr.StudyInstanceUID == study and sr.Modality == "SR"
    assert srs[0]["SOPInstanceUID"] == sr.SOPInstanceUID
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in lung1_series}

    from node.results.sr_read import sr_summary

    summary = sr_summary(sr)
    result = outcome(node, study)["result"]
    assert summary["probability"] == pytest.approx(result["score"], abs=0.01)  # whole percent, 1..99
    assert summary["qualitative"] == ("positive" if result["score"] >= result["threshold"] else "negative")
    if have("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(sr_files[0])], capture_output=True, text=True)
        assert [l for l in check.stderr.splitlines() if l.startswith("Error")] == []
    if have("dsrdump"):
        dump = subprocess.run(["dsrdump", str(sr_files[0])], capture_output=True, text=True)
        assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout
    state = {s["study_uid"]: s for s in results_list(node)}[study]
    assert state["state"] == "sent" and "pacs: sent" in state["detail"]
    assert state["received_at"] <= state["last_at"]
    show = subprocess.run([sys.executable, "-m", "node", "results", "show", study, "--config", str(node.config)],
                          capture_output=True, text=True, check=True, cwd=node.workdir).stdout
    artifacts = Path(os.environ.get("AINODE_ARTIFACTS") or Path(__file__).parent / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "results-show.txt").write_text(show)  # what an admin reads
    lines = show.splitlines()
    assert lines[0] == f"study {study}: sent, revision 1, 48 instances"
    story = "\n".join(lines[2:])
    for step in ("48 instance(s) stored from STORESCU", "r1 complete (quiet), 48 instances queued",
                 "r1 analysis started (pipeline AINODE)", "r1 analysed (pipeline AINODE), 3 object(s) made"):
        assert step in story, (step, show)
    assert story.index("stored from") < story.index("complete (quiet)") < story.index("analysis started")
    assert "sent" in lines[-1]  # the delivery, last
    listed = subprocess.run([sys.executable, "-m", "node", "results", "list", "--state", "sent", "--since", "1h",
                             "--config", str(node.config)], capture_output=True, text=True, check=True).stdout
    assert study in listed
    none = subprocess.run([sys.executable, "-m", "node", "results", "list", "--state", "dead",
                           "--config", str(node.config)], capture_output=True, text=True, check=True).stdout
    assert study not in none


def test_pacs_down_then_back_delivers(nodes, lung1_series, test_model, tmp_path):
    port = free_port()  # nothing listens there yet
    node = node_with(nodes, test_model, port, dest_ae="PACS")
    assert storescu(lung1_series[:20], node.port).returncode == 0
    study = study_of(lung1_series[0])
    wait_until(lambda: (send_state(node, study) or {}).get("status") == "retrying", 90, "a failed send attempt")
    scp = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(tmp_path), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env())
    try:
        wait_until(lambda: (send_state(node, study) or {}).get("status") == "sent", 60, "delivery once the PACS is back")
        assert len(list(tmp_path.iterdir())) == 3  # SR, summary image, key objects
        assert send_state(node, study)["attempts"] >= 2
    finally:
        scp.kill()
        scp.wait(10)


def test_wrong_ae_at_pacs_recorded_then_resend_works(nodes, pacs, lung1_series, test_model):
    node = node_with(nodes, test_model, pacs.port, dest_ae="WRONGAE", retry_hours=0.0004)  # ~1 retry, then dead
    assert storescu(lung1_series[:20], node.port).returncode == 0
    study = study_of(lung1_series[0])
    wait_until(lambda: (send_state(node, study) or {}).get("status") == "dead", 90, "the send to be dead-lettered")
    assert "rejected" in send_state(node, study)["last_error"]
    state = {s["study_uid"]: s for s in results_list(node)}[study]
    assert state["state"] == "dead" and "rejected" in state["detail"]
    from node.cli import main

    assert main(["--config", str(node.config), "dest", "remove", "pacs"]) == 0
    assert main(["--config", str(node.config), "dest", "add", "pacs", "--ae", "ORTHANC", "--host", "127.0.0.1",
                 "--port", str(pacs.port)]) == 0
    node.signal(signal.SIGHUP)
    assert main(["--config", str(node.config), "results", "resend", study]) == 0
    wait_until(lambda: pacs.instances_of_study(study, "SR"), 60, "the resent SR in Orthanc")
    # the SR goes first; the state says sent once the summary image and key objects are stored too
    wait_until(lambda: send_state(node, study)["status"] == "sent", 30, "the resend recorded as sent")
    assert sorted(send_state(node, study)["objects"]) == ["ko", "sc", "sr-comprehensive"]


def test_late_instance_gives_second_sr_naming_the_first(nodes, pacs, lung1_series, test_model):
    node = node_with(nodes, test_model, pacs.port)
    study = study_of(lung1_series[0])
    assert storescu(lung1_series[:40], node.port).returncode == 0
    first = wait_until(lambda: pacs.instances_of_study(study, "SR"), 90, "the first SR")
    assert storescu(lung1_series[40:], node.port).returncode == 0
    def two_srs() -> list[dict] | None:
        srs = pacs.instances_of_study(study, "SR")
        return srs if len(srs) == 2 else None

    srs = wait_until(two_srs, 90, "the second SR")
    second = next(s for s in srs if s["SOPInstanceUID"] != first[0]["SOPInstanceUID"])
    sr2 = pydicom.dcmread(next(p for p in (node.storage / "results" / study).glob("*.dcm")
                               if p.stem == second["SOPInstanceUID"]))
    refs = [i.ReferencedSOPInstanceUID for s in sr2.PredecessorDocumentsSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert refs == [first[0]["SOPInstanceUID"]]


def test_non_ct_and_corrupt_studies_recorded_worker_stays_healthy(nodes, pacs, lung1_series, test_model, tmp_path):
    node = node_with(nodes, test_model, pacs.port)
    mr = get_testdata_file("MR_small.dcm", download=False)
    assert storescu([mr], node.port).returncode == 0
    mr_study = study_of(Path(mr))
    wait_until(lambda: outcome(node, mr_study), 60, "the MR study's outcome")
    assert outcome(node, mr_study)["status"] == "no_result"
    assert "CT" in outcome(node, mr_study)["reason"]

    # A CT series whose pixel data is corrupt (JPEG 2000 codestream cut short).
    from pydicom.uid import JPEG2000Lossless

    from node.sample import load_lung1, write_ct_series

    volume, spacing, origin, _ = load_lung1(None)
    files = write_ct_series(volume[10:22], spacing, tmp_path / "bad", transfer_syntax=JPEG2000Lossless,
                            first_position=origin)
    ds = pydicom.dcmread(files[5])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3] + b"\x00" * 64])  # a valid item, a broken codestream
    ds.save_as(files[5])
    assert scu_store(node.port, files) == [0] * len(files)  # stored: the receive path does not decode pixels
    bad_study = study_of(files[0])
    wait_until(lambda: outcome(node, bad_study), 60, "the corrupt study's outcome")
    assert outcome(node, bad_study)["status"] == "failed"

    assert storescu(lung1_series, node.port).returncode == 0  # the next study still works
    wait_until(lambda: pacs.instances_of_study(study_of(lung1_series[0]), "SR"), 90, "the SR of the good study")
    assert pacs.instances_of_study(mr_study, "SR") == [] and pacs.instances_of_study(bad_study, "SR") == []
