"""``ainode demo``: the first five minutes, with no config.

In a temp folder: start a PACS stand-in (a pynetdicom storage SCP), start the
node on its embedded default with one worker and the bundled model, push the
real lung1 chest CT series to it, wait for the SR at the PACS and print the
result: the score, the key slices and the SR's content tree.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

PACS_AE = "DEMOPACS"
WAIT_S = 600.0
_VALUE_KEYWORDS = {"TEXT": "TextValue", "UIDREF": "UID", "DATETIME": "DateTime", "DATE": "Date", "TIME": "Time",
                   "PNAME": "PersonName"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PacsStandIn:
    """A storage SCP on 127.0.0.1 that keeps what it receives in a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.received: list[Path] = []
        self.arrived = threading.Event()

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = self.folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.received.append(path)
            self.arrived.set()
            return 0x0000

        ae = AE(ae_title=PACS_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


def content_tree(ds: Dataset, depth: int = 0) -> list[str]:
    """The SR's content items as indented lines (concept name = value); images' acquisition context left out."""
    lines = []
    for item in ds.get("ContentSequence", []):
        if item.get("RelationshipType") == "HAS ACQ CONTEXT":
            continue
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        kind = item.ValueType
        if kind == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif kind == "NUM":
            mv = item.MeasuredValueSequence[0]
            value = f"{mv.NumericValue} {mv.MeasurementUnitsCodeSequence[0].CodeValue}"
        elif kind in _VALUE_KEYWORDS:
            value = str(item.get(_VALUE_KEYWORDS[kind], ""))
        elif kind == "IMAGE":
            value = "image " + item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        elif kind == "SCOORD":
            value = f"{item.GraphicType} {[round(float(v), 1) for v in item.GraphicData]} (column, row)"
        else:
            value = ""
        lines.append(f"{'  ' * depth}{kind} {name}: {value}".rstrip(": "))
        lines += content_tree(item, depth + 1)
    return lines


def run_demo(keep: bool = False, slices: int | None = None) -> int:
    """Run the demo; returns the exit code."""
    from node.results.sr_read import sr_summary
    from node.sample import make_lung1_series

    work = Path(tempfile.mkdtemp(prefix="ainode-demo-", dir="/tmp"))
    pacs = PacsStandIn(work / "pacs")
    (work / "pacs").mkdir()
    port = _free_port()
    cfg = work / "ainode.toml"
    cfg.write_text(
        f'[node]\nport = {port}\nstorage = "{work / "storage"}"\nmin_free_mb = 100\n'
        "[completion]\nquiet_seconds = 2\n"
        f"[web]\nport = {_free_port()}\n"
        f'[[destinations]]\nname = "demo-pacs"\nae_title = "{PACS_AE}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
    )
    print(f"ainode demo in {work}")
    pacs.start()
    log = open(work / "node.log", "wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "--config", str(cfg), "serve", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        print("fetching the lung1 chest CT (pyradiomics 3.0.1 sample data; cached after the first run)...")
        files = make_lung1_series(work / "ct", n_slices=slices)
        _wait_for_node(port, node, work / "node.log")
        started = time.monotonic()
        _push(files, port)
        print(f"sent {len(files)} CT slices to AINODE@127.0.0.1:{port}; waiting for the SR at {PACS_AE}...")
        if not pacs.arrived.wait(WAIT_S):
            print(f"no SR within {WAIT_S:.0f} s; see {work / 'node.log'}", file=sys.stderr)
            return 1
        time.sleep(1.0)  # the summary image and key objects follow the SR in the same association
        arrived = [dcmread(p, stop_before_pixels=True) for p in pacs.received]
        sr = dcmread(next(p for p, ds in zip(pacs.received, arrived) if ds.Modality == "SR" and
                          "ContentTemplateSequence" in ds))
        summary = sr_summary(sr)
        print(f"SR received after {time.monotonic() - started:.1f} s (quiet period 2 s included)")
        print(f"  study            {sr.StudyInstanceUID}")
        print(f"  {summary['impression']}")
        for f in summary["findings"]:
            number = _instance_number(work / "ct", f["image_uid"])
            (col, row), = f["graphic_data"][:1]
            print(f"  finding          {f['tracking_id']}: {f['probability']:.0%} on image {number}, "
                  f"pixel (row {row:.0f}, column {col:.0f})")
        numbers = [_instance_number(work / "ct", uid) for uid in summary.get("key_image_uids", [])]
        where = " (the labelled lung1 nodule is on 33-35)" if slices is None else ""
        print(f"  key images       instance numbers {', '.join(numbers)}{where}")
        print(f"  also received    {', '.join(sorted(str(ds.get('SeriesDescription', ds.Modality)) for ds in arrived))}")
        print("  content tree:")
        for line in content_tree(sr):
            print("    " + line)
        return 0
    finally:
        node.terminate()
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
        log.close()
        pacs.stop()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _instance_number(folder: Path, sop_uid: str) -> str:
    path = folder / f"{sop_uid}.dcm"
    return str(dcmread(path, stop_before_pixels=True).InstanceNumber) if path.exists() else "?"


def _wait_for_node(port: int, node: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while "ainode listening" not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the node did not start; see {log}")
        time.sleep(0.1)


def _push(files: list[Path], port: int) -> None:
    from pynetdicom import AE, _config

    ae = AE(ae_title="DEMOCT")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        raise RuntimeError("the node did not accept the association")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if not status or int(status.Status) != 0:
                raise RuntimeError(f"C-STORE of {path.name} failed")
    finally:
        assoc.release()
