"""OHIF v3 (3.13.2) in headless Chromium draws an SR's finding over the CT, or nothing.

Hand-built TID 1500 SRs (tests.viewer.measurement_sr) over the real lung1 CT, served by a throw-away
Orthanc (DICOMweb + the OHIF build on one origin). Screenshots go to $AINODE_ARTIFACTS (else
tests/artifacts/). What was learnt about OHIF is in tests/viewer.py's measurement_sr and the lead's
report; these tests pin it:

- a TID 1410 group with a SCOORD POINT or CIRCLE SELECTED FROM a CT image is drawn on that image,
  at its coordinates, labelled "<NUM concept meaning>: <value, 2 decimals> <unit code value>";
- a TID 1500 SR whose only group has no coordinates shows an empty (black) SR viewport;
- one coordinate-less group next to a SCOORD group makes OHIF draw nothing at all.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.viewer import ViewerOrthanc, measurement_sr, viewer_unavailable

pytestmark = pytest.mark.timeout(300)

#: The lung1 nodule: slice index 33 of 48 (Instance Number 34), centred at column 218, row 358
#: (from lung1_label.nrrd); about 22 px (12.5 mm) across.
KEY_INDEX = 33
NODULE = (218.0, 358.0)
RADIUS_PX = 12.0


def artifacts_dir() -> Path:
    env = os.environ.get("AINODE_ARTIFACTS")
    path = Path(env) if env else Path(__file__).resolve().parent / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def ct(lung1_series: list[Path]) -> list[Any]:
    """The lung1 CT headers in Instance Number order."""
    import pydicom

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in lung1_series]
    headers.sort(key=lambda ds: int(ds.InstanceNumber))
    assert len(headers) == 48
    return headers


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, lung1_series: list[Path]) -> Iterator[ViewerOrthanc]:
    """Orthanc with DICOMweb and OHIF, holding the lung1 CT."""
    reason = viewer_unavailable()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the viewer test: {reason}")  # .ci/run installs what it needs
    if reason:
        pytest.skip(reason)
    with ViewerOrthanc(tmp_path_factory.mktemp("viewer")) as server:
        server.store(lung1_series)
        yield server


def open_sr(pacs: ViewerOrthanc, tmp_path: Path, sr: Any, name: str) -> dict[str, Any]:
    """Store ``sr``, open its study with the SR in OHIF, delete the SR again; the driver's result."""
    path = tmp_path / f"{name}.dcm"
    sr.save_as(path, enforce_file_format=True)
    pacs.store([path])
    try:
        result = pacs.open_study(str(sr.StudyInstanceUID), artifacts_dir() / f"ohif-{name}.png",
                                 open_sr=True, sr_series_uid=str(sr.SeriesInstanceUID))
    finally:
        for series in pacs.get("/series"):
            if pacs.get(f"/series/{series}")["MainDicomTags"].get("SeriesInstanceUID") == str(sr.SeriesInstanceUID):
                urllib.request.urlopen(urllib.request.Request(f"{pacs.base}/series/{series}", method="DELETE"),
                                       timeout=10).read()
    assert result["ct_rendered"], result["error"]
    assert result["sr_opened"], result["error"]
    assert result["blocked_requests"] == [], "the viewer tried to reach another host"
    assert Path(result["screenshot"]).stat().st_size > 10_000
    return result


def sr_errors(result: dict[str, Any]) -> list[str]:
    return [e for e in result["console_errors"] if "unhandledrejection" in e or "pageerror" in e]


@pytest.mark.parametrize("graphic_type", ["POINT", "CIRCLE"])
def test_scoord_finding_is_drawn_on_its_slice(pacs: ViewerOrthanc, ct: list[Any], tmp_path: Path,
                                              graphic_type: str) -> None:
    key = ct[KEY_INDEX]
    sr = measurement_sr(ct, key, NODULE, graphic_type=graphic_type, radius_px=RADIUS_PX, value=87)
    result = open_sr(pacs, tmp_path, sr, f"scoord-{graphic_type.lower()}")

    assert result["ok"], result["error"]
    assert sr_errors(result) == []
    # the SR viewport shows the referenced slice...
    assert result["sop_instance_uid"] == str(key.SOPInstanceUID)
    assert result["instance_number"] == int(key.InstanceNumber) == KEY_INDEX + 1
    assert result["slices"] == 48
    # ...with the finding drawn over the nodule, labelled with the NUM
    assert result["annotations"] >= 1, result
    if graphic_type == "CIRCLE":
        circles = [g for g in result["geometry"] if g["tag"] == "ellipse"]
        assert len(circles) == 1, result["geometry"]
        assert circles[0]["center"] == pytest.approx(list(NODULE), abs=1.5)
        assert circles[0]["radius"] == pytest.approx(RADIUS_PX, abs=1.5)
    else:  # an arrow: three lines ending on the point
        tips = [g["to"] for g in result["geometry"] if g["tag"] == "line"]
        assert any(t == pytest.approx(list(NODULE), abs=1.5) for t in tips), result["geometry"]
    text = " ".join(result["annotation_texts"])
    assert "Probability of cancer: 87.00 %" in text
    assert "363698007: Lung" in text  # the finding site, labelled with its SCT concept code
    (measurement,) = result["sr"][0]["measurements"]
    assert measurement["loaded"] and measurement["graphicType"] == graphic_type


def test_tid1500_without_coordinates_draws_nothing(pacs: ViewerOrthanc, ct: list[Any], tmp_path: Path) -> None:
    sr = measurement_sr(ct, None, graphic_type=None, value=12)
    result = open_sr(pacs, tmp_path, sr, "no-scoord")

    assert result["annotations"] == 0, result
    (shown,) = result["sr"]
    assert shown["isImagingMeasurementReport"]
    (measurement,) = shown["measurements"]
    assert measurement["coords"] == 0 and not measurement["loaded"]
    assert measurement["labels"] == [{"label": "Probability of cancer", "value": "12.00 %"}]
    # the SR viewport stays empty (black): no image, no overlay
    sr_viewports = [v for v in result["viewports"] if shown["displaySetInstanceUID"] in v["displaySetUIDs"]]
    assert not any(v["hasImage"] for v in sr_viewports)
    assert result["instance_number"] is None


def test_a_group_without_coordinates_hides_the_finding(pacs: ViewerOrthanc, ct: list[Any], tmp_path: Path) -> None:
    """OHIF walks the groups last to first and throws on the first one without a SCOORD."""
    sr = measurement_sr(ct, ct[KEY_INDEX], NODULE, graphic_type="CIRCLE", radius_px=RADIUS_PX, study_group=True)
    result = open_sr(pacs, tmp_path, sr, "scoord-plus-study-group")

    assert result["annotations"] == 0, result
    assert [m["loaded"] for m in result["sr"][0]["measurements"]] == [False, False]
    assert any("ReferencedSOPSequence" in e for e in sr_errors(result)), result["console_errors"]


# ------------------------------------------------------------------ ainode's own result, end to end


def through_the_node(nodes: list, pacs: ViewerOrthanc, files: list[Path]) -> tuple[str, dict[str, Any]]:
    """``files`` stored by DCMTK into a node (bundled model) whose destination is the viewer's Orthanc;
    the study's UID and its recorded outcome once the three result objects are in Orthanc."""
    import json

    import pydicom

    from tests.peers import NodeProcess, short_tmp, storescu, wait_until

    extra = (f'[model]\ndevice = "cpu"\n[send]\nretry_first_seconds = 1\ntimeout_seconds = 10\n'
             f'[[destinations]]\nname = "viewer"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\nport = {pacs.port}\n')
    node = NodeProcess(short_tmp(), quiet=1.0, workers=1, extra_config=extra)
    nodes.append(node.start())
    assert storescu(files, node.port).returncode == 0
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    for modality in ("SR", "OT", "KO"):  # the SR, the summary image and the key objects
        wait_until(lambda: pacs.instances_of_study(study, modality), 120, f"the {modality} in Orthanc")
    outcome = json.loads((node.storage / "state" / study / "rev-0001.outcome.json").read_text())
    return study, outcome


def open_result(pacs: ViewerOrthanc, study: str, name: str) -> dict[str, Any]:
    (sr,) = pacs.instances_of_study(study, "SR")
    result = pacs.open_study(study, artifacts_dir() / f"ohif-{name}.png", open_sr=True,
                             sr_series_uid=sr["SeriesInstanceUID"])
    assert result["ct_rendered"] and result["sr_opened"], result["error"]
    assert result["blocked_requests"] == []
    return result


def bundled_with_map() -> bool:
    from node.infer import bundled_model_path
    from node.model_card import ModelCard

    return bundled_model_path().exists() and bool(ModelCard.read(bundled_model_path()).map_output_name)


@pytest.mark.skipif(not bundled_with_map(), reason="the bundled model (with a score map) is not installed")
def test_ohif_draws_ainodes_finding_on_its_slice(pacs: ViewerOrthanc, nodes: list, lung1_series: list[Path]) -> None:
    """The real lung1 CT through ainode: OHIF draws the SR's finding over the CT, on the finding's slice."""
    study, outcome = through_the_node(nodes, pacs, lung1_series)
    findings = outcome["result"]["findings"]
    assert findings, outcome["result"]
    top = findings[0]
    result = open_result(pacs, study, "ainode-positive")

    assert result["ok"], result["error"]
    assert sr_errors(result) == []
    assert result["sop_instance_uid"] == top["image"]["sop_instance_uid"]  # the finding's slice is shown...
    assert result["instance_number"] == top["image"]["instance_number"]
    assert result["annotations"] >= 1, result  # ...with the finding drawn on it, where the SR says
    point = [top["column"] + 0.5, top["row"] + 0.5]
    tips = [g["to"] for g in result["geometry"] if g["tag"] == "line"]
    assert any(t == pytest.approx(point, abs=1.5) for t in tips), (point, result["geometry"])
    assert f"Probability of cancer: {round(100 * top['probability'])}.00 %" in " ".join(result["annotation_texts"])


@pytest.mark.skipif(not bundled_with_map(), reason="the bundled model (with a score map) is not installed")
def test_ohif_draws_nothing_for_a_negative_study(pacs: ViewerOrthanc, nodes: list, tmp_path: Path) -> None:
    """lung1's lower slices (no nodule) as a study of their own: a negative SR, nothing drawn."""
    from node.sample import load_lung1, write_ct_series

    volume, spacing, origin, _ = load_lung1(None)
    files = write_ct_series(volume[4:20], spacing, tmp_path / "ct", first_position=origin)
    pacs.store(files)  # the PACS has the study too (the scanner sent it to both)
    study, outcome = through_the_node(nodes, pacs, files)
    assert outcome["result"]["score"] < outcome["result"]["threshold"] and outcome["result"]["findings"] == []
    result = open_result(pacs, study, "ainode-negative")

    assert result["annotations"] == 0, result
    (shown,) = result["sr"]
    assert [m["coords"] for m in shown["measurements"]] == [0]
