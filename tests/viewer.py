"""OHIF v3 in a real browser, for tests: does the viewer draw an SR's finding over the CT?

Pieces (see ../shared/PEERS.md, "OHIF v3 in a real browser"):

- the built OHIF viewer (npm ``@ohif/app``, its ``dist/``) and ``puppeteer-core`` 24.x, installed
  once by ``tests/ohif/install.sh`` into a cache folder outside the repo (:func:`ohif_cache_dir`);
- Debian's ``chromium`` (headless; puppeteer never downloads a browser);
- a throw-away Orthanc (:class:`ViewerOrthanc`) with the DICOMweb plugin at ``/dicom-web/`` and the
  ServeFolders plugin serving a prepared copy of OHIF's ``dist`` on the same origin (no CORS);
- ``tests/ohif/open_study.js``, the browser driver, run by :func:`open_study`.

Orthanc 1.10.1's ServeFolders cannot serve a folder at ``/`` ("The URI of a folder to be served
cannot be empty"), so the viewer is served at :data:`SITE_PREFIX` (``/ohif/``) and
:func:`prepare_site` rewrites the build's public path (``window.PUBLIC_URL``, the bundles'
``__webpack_require__.p``, ``url(/`` in CSS, ``src=/href=`` in ``index.html``) and writes
``app-config.js`` (DICOMweb data source at the same origin's ``/dicom-web``, no tour, no
investigational-use dialog). Every unchanged file is a symbolic link into the cache.

Typical use (pytest, session-scoped)::

    from tests.viewer import ViewerOrthanc, viewer_unavailable
    reason = viewer_unavailable()
    if reason: pytest.skip(reason)
    with ViewerOrthanc(tmp_path / "pacs") as pacs:
        pacs.store(ct_files + [sr_file])
        result = pacs.open_study(study_uid, tmp_path / "shot.png", open_sr=True)
        assert result["annotations"] >= 1

Everything listens on 127.0.0.1 on free ports, every wait is bounded, every process is stopped by
its PID (the browser driver runs in its own process group, killed as a group on timeout). The
browser may only talk to the Orthanc origin: every other request is aborted and reported, and
Chromium resolves no host name but 127.0.0.1.

What OHIF 3.13.2 needs to draw an SR's finding (measured with :func:`measurement_sr` over lung1 in
the default "viewer" mode; the code is extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts):

- SOP class Comprehensive (.88.33), Enhanced (.88.22) or Comprehensive 3D (.88.34) SR, all drawn
  alike; the root concept must be (126000, DCM, "Imaging Measurement Report"), else OHIF shows the
  SR as text only.
- Groups (125007, DCM, "Measurement Group") in (126010, DCM) "Imaging Measurements". Each needs a
  Tracking Unique Identifier (UIDREF 112040) *and* a Tracking Identifier (TEXT 112039): without
  the TEXT OHIF throws (TypeError ... 'TextValue') and draws nothing.
- The group needs a SCOORD (any concept name; highdicom's 111030 "Image Region" works) of graphic
  type POINT (drawn as an arrow onto the point), CIRCLE (an ellipse), POLYLINE, MULTIPOINT or
  ELLIPSE, whose ContentSequence has the SELECTED FROM IMAGE reference of a loaded CT image. The
  SR viewport opens on the image of the *first* group and draws every group of that image.
  SCOORD3D (in a .88.34 SR) loads but the viewport stays on slice 1: nothing is seen.
- No NUM, finding site or qualitative evaluation is needed to draw; they only make the label.
- Every group needs a SCOORD: OHIF places groups last to first and throws on the first group
  without one (TypeError ... 'ReferencedSOPSequence'). A coordinate-less TID 1501 group *after* a
  TID 1410 group: nothing drawn, black viewport. *Before* it: the finding is placed but the SR
  viewport opens on group 0, which has no image: black viewport. A TID 1500 SR whose only group
  has no coordinates: black viewport, nothing drawn. A Qualitative Evaluations container (TEXT,
  CODE) beside Imaging Measurements is ignored and harmless.
- The label (text box by the shape, at most 5 lines): one line per NUM,
  "<concept name CodeMeaning>: <NumericValue with 2 decimals> <unit CodeValue>" (NUM 87, UCUM "%"
  gives "Probability of cancer: 87.00 %"), then a finding site (363698007, SCT) as
  "363698007: <site CodeMeaning>" ("363698007: Lung"). Finding type and CODE evaluations are not
  shown. No NUM and no site: an empty text box.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Sequence

from tests.peers import DICOMWEB_PLUGIN, PLUGIN_DIR, REPO, Orthanc, have, storescu

OHIF_VERSION = "3.13.2"
PUPPETEER_VERSION = "24.43.1"
SITE_PREFIX = "/ohif"
SERVEFOLDERS_PLUGIN = PLUGIN_DIR / "libServeFolders.so"
INSTALL_SCRIPT = REPO / "tests" / "ohif" / "install.sh"
DRIVER = REPO / "tests" / "ohif" / "open_study.js"
#: Upper bound for one :func:`open_study` (browser start, CT render, SR open, screenshot).
OPEN_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- install


def ohif_cache_dir() -> Path:
    """``$AINODE_OHIF_CACHE``, else ``${AINODE_CACHE:-~/.cache/ainode}/ohif`` (as install.sh)."""
    env = os.environ.get("AINODE_OHIF_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("AINODE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "ainode") / "ohif"


def ohif_dist(cache: Path | None = None) -> Path:
    return (cache or ohif_cache_dir()) / f"app-{OHIF_VERSION}" / "dist"


def puppeteer_dir(cache: Path | None = None) -> Path:
    return (cache or ohif_cache_dir()) / "node_modules" / "puppeteer-core"


def chromium_binary() -> str | None:
    """``$AINODE_CHROMIUM``, else Debian's ``chromium`` (or ``chromium-browser``) on PATH."""
    env = os.environ.get("AINODE_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def installed(cache: Path | None = None) -> bool:
    """Both npm pieces are in the cache, at the pinned versions."""
    cache = cache or ohif_cache_dir()
    pkg = puppeteer_dir(cache) / "package.json"
    try:
        version = json.loads(pkg.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return False
    return (ohif_dist(cache) / "index.html").is_file() and version == PUPPETEER_VERSION


def install_ohif(timeout: float = 600) -> Path:
    """Run ``tests/ohif/install.sh`` (idempotent, seconds when cached); the cache folder.

    Raises RuntimeError with the script's last lines when it fails.
    """
    cache = ohif_cache_dir()
    if installed(cache):
        return cache
    env = {**os.environ, "AINODE_OHIF_CACHE": str(cache), "AINODE_OHIF_VERSION": OHIF_VERSION,
           "AINODE_PUPPETEER_VERSION": PUPPETEER_VERSION}
    try:
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{INSTALL_SCRIPT.name} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0 or not installed(cache):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise RuntimeError(f"{INSTALL_SCRIPT.name} failed (exit {proc.returncode}): {tail}")
    return cache


def viewer_unavailable(install: bool = True) -> str | None:
    """Why the OHIF harness cannot run here (for ``pytest.skip``), or None when it can.

    With ``install`` (default) the npm pieces are installed into the cache when missing.
    """
    missing = [tool for tool in ("Orthanc", "node", "storescu") if not have(tool)]
    if chromium_binary() is None:
        missing.append("chromium")
    missing += [str(p) for p in (DICOMWEB_PLUGIN, SERVEFOLDERS_PLUGIN) if not p.is_file()]
    if missing:
        return f"OHIF viewer harness needs {', '.join(missing)} (Debian: chromium orthanc orthanc-dicomweb dcmtk nodejs)"
    if not installed():
        if not install or not have("npm"):
            return f"@ohif/app@{OHIF_VERSION} / puppeteer-core@{PUPPETEER_VERSION} not in {ohif_cache_dir()} (run {INSTALL_SCRIPT})"
        try:
            install_ohif()
        except RuntimeError as exc:
            return f"cannot install the OHIF viewer harness: {exc}"
    return None


# --------------------------------------------------------------------------- the served site


def app_config_js(data_source_name: str = "orthanc") -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source at this origin's ``/dicom-web``."""
    return """/** ainode test harness: OHIF against the Orthanc that serves it (same origin). */
(function () {
  var root = window.location.origin + '/dicom-web';
  window.config = {
    name: 'ainode-test',
    routerBasename: '%(prefix)s',
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: false,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
    showErrorDetails: 'always',
    defaultDataSourceName: '%(name)s',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: '%(name)s',
        configuration: {
          friendlyName: 'ainode test Orthanc',
          name: '%(name)s',
          wadoUriRoot: root,
          qidoRoot: root,
          wadoRoot: root,
          qidoSupportsIncludeField: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
  };
})();
""" % {"prefix": SITE_PREFIX, "name": data_source_name}


_PUBLIC_PATH = 'window.PUBLIC_URL="/"'
_WEBPACK_PUBLIC_PATH = '__webpack_require__.p = "/";'


def prepare_site(dest: Path, dist: Path | None = None, prefix: str = SITE_PREFIX) -> Path:
    """A copy of OHIF's ``dist`` in ``dest`` that works when served at ``prefix + "/"``.

    Unchanged files are symbolic links into ``dist``; the files that name the public path are
    rewritten; ``viewer`` is a copy of ``index.html`` (ServeFolders has no SPA fallback). Returns
    ``dest``.
    """
    dist = dist or ohif_dist()
    if not (dist / "index.html").is_file():
        raise FileNotFoundError(f"no OHIF build in {dist}")
    prefix = "/" + prefix.strip("/")
    dest.mkdir(parents=True, exist_ok=True)
    rewritten = 0
    for src in sorted(dist.iterdir()):
        target = dest / src.name
        if src.name == "app-config.js":
            continue
        if src.is_file() and src.suffix in (".js", ".css", ".html", ".json"):
            text = src.read_text(encoding="utf-8", errors="surrogateescape")
            new = text
            if src.suffix == ".js" and _WEBPACK_PUBLIC_PATH in text:
                new = text.replace(_WEBPACK_PUBLIC_PATH, f'__webpack_require__.p = "{prefix}/";')
            elif src.suffix == ".css":
                new = text.replace("url(/", f"url({prefix}/")
            elif src.name == "manifest.json":
                new = text.replace('"/', f'"{prefix}/')
            elif src.name == "index.html":
                new = text.replace(_PUBLIC_PATH, f'window.PUBLIC_URL="{prefix}/"')
                new = re.sub(r'(src|href)="/(?!/)', rf'\1="{prefix}/', new)
            if new != text:
                target.write_text(new, encoding="utf-8", errors="surrogateescape")
                rewritten += 1
                continue
        target.symlink_to(src)
    index = (dest / "index.html").read_text()
    if f'window.PUBLIC_URL="{prefix}/"' not in index or rewritten < 3:
        raise RuntimeError(f"OHIF {OHIF_VERSION} build layout not as expected in {dist} (rewrote {rewritten} files)")
    shutil.copyfile(dest / "index.html", dest / "viewer")
    (dest / "app-config.js").write_text(app_config_js())
    return dest


# --------------------------------------------------------------------------- Orthanc + OHIF


class ViewerOrthanc(Orthanc):
    """Orthanc with DICOMweb at ``/dicom-web/`` and OHIF at ``/ohif/`` on free 127.0.0.1 ports.

    ``tests.peers.Orthanc`` with a config that loads the two plugins; a context manager.
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC") -> None:
        super().__init__(workdir, aet=aet, check_called_aet=True)
        self.site = workdir / "ohif-site"
        self.console_log = workdir / "browser.log"

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "Name": "ainode-test-viewer", "HttpCompressionEnabled": False, "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN), str(SERVEFOLDERS_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
            "ServeFolders": {
                "AllowCache": True, "GenerateETag": True,
                "Folders": {SITE_PREFIX + "/": str(self.site)},
                "Extensions": {".wasm": "application/wasm", ".mjs": "application/javascript",
                               ".woff2": "font/woff2", ".map": "application/json", ".ico": "image/x-icon",
                               ".txt": "text/plain", "": "text/html"},
            },
        }

    def start(self) -> "ViewerOrthanc":
        if not (self.site / "viewer").is_file():
            prepare_site(self.site)
        super().start()
        return self

    def _ready(self) -> bool:
        if not super()._ready():
            return False
        import urllib.error
        import urllib.request

        try:  # the plugins are up too: DICOMweb answers and the viewer page is served
            with urllib.request.urlopen(self.base + "/dicom-web/studies", timeout=5) as rsp:
                rsp.read()
            with urllib.request.urlopen(self.base + SITE_PREFIX + "/viewer", timeout=5) as rsp:
                return b"PUBLIC_URL" in rsp.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Orthanc plugins not serving ({exc}); see {self.workdir / 'orthanc.log'}") from exc
        except OSError:
            return False

    def __enter__(self) -> "ViewerOrthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def store(self, files: Sequence[Path | str], timeout: float = 300) -> None:
        """C-STORE the files with DCMTK storescu (one association, TCP_NODELAY); fails on any error."""
        proc = storescu(files, self.port, called=self.aet, extra=["-R"], timeout=timeout)
        if proc.returncode != 0 or "E:" in proc.stderr:
            raise AssertionError(f"storescu into Orthanc failed ({proc.returncode}):\n{proc.stderr[-2000:]}")

    def viewer_url(self, study_uid: str) -> str:
        return f"{self.base}{SITE_PREFIX}/viewer?StudyInstanceUIDs={study_uid}"

    def open_study(self, study_uid: str, screenshot: Path, open_sr: bool = True, **kw: Any) -> dict[str, Any]:
        """:func:`open_study` on this Orthanc's viewer."""
        kw.setdefault("log", self.console_log)
        return open_study(self.viewer_url(study_uid), screenshot, open_sr=open_sr, **kw)


# --------------------------------------------------------------------------- the browser


def open_study(url: str, screenshot: Path, open_sr: bool = True, *, sr_series_uid: str | None = None,
               timeout: float = OPEN_TIMEOUT_S, settle_ms: int = 2500, viewport: tuple[int, int] = (1280, 800),
               log: Path | None = None) -> dict[str, Any]:
    """Open ``url`` (an OHIF ``viewer?StudyInstanceUIDs=...``) in headless Chromium and report.

    Waits for the CT to render, then (``open_sr``) opens the study's SR display set (double-click on
    its thumbnail in the study browser; the one of ``sr_series_uid`` when given, else the newest),
    waits for the SR viewport, lets it settle ``settle_ms`` and saves a PNG to ``screenshot``.

    Returns the driver's JSON (keys documented in tests/ohif/open_study.js), notably:
    ``annotations`` (shapes in cornerstone's ``svg.svg-layer`` of the active viewport),
    ``annotation_texts``, ``instance_number`` / ``slice`` (from the viewport overlay),
    ``sr`` (OHIF's SR display set: measurements, labels, loaded), ``console_errors``,
    ``blocked_requests``, ``timings``. Raises AssertionError when the driver fails or runs past
    ``timeout`` (then its whole process group, browser included, is killed).
    """
    screenshot = Path(screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    chromium = chromium_binary()
    if chromium is None:
        raise AssertionError("chromium not found")
    args = {
        "url": url, "screenshot": str(screenshot), "openSr": bool(open_sr), "srSeriesUid": sr_series_uid,
        "chromium": chromium, "timeoutMs": int(timeout * 1000) - 3000, "settleMs": settle_ms,
        "width": viewport[0], "height": viewport[1],
    }
    env = {**os.environ, "NODE_PATH": str(ohif_cache_dir() / "node_modules"), "OPEN_STUDY_ARGS": json.dumps(args)}
    env.pop("PUPPETEER_EXECUTABLE_PATH", None)
    proc = subprocess.Popen(["node", str(DRIVER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout + 10)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"open_study timed out after {timeout + 10:.0f} s:\n{err[-3000:]}")
    finally:
        _kill_group(proc)  # a browser left behind by a crashed driver
    if log is not None:
        with open(log, "a") as f:
            f.write(f"--- {url}\n{err}\n")
    result = _last_json(out)
    if result is None:
        raise AssertionError(f"open_study.js exited {proc.returncode} without a result:\n{out[-2000:]}\n{err[-3000:]}")
    result["exit_code"] = proc.returncode
    return result


def _last_json(out: str) -> dict[str, Any] | None:
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the driver's process group (node and the chromium it started), by its PID."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass



# --------------------------------------------------------------------------- hand-built SRs


SR_CLASSES = {
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
}


def measurement_sr(
    sources: Sequence[Any],
    image: Any | None,
    center: tuple[float, float] | None = None,
    *,
    graphic_type: str | None = "POINT",
    radius_px: float = 10.0,
    sr_class: str = "comprehensive",
    scoord3d: bool = False,
    value: float | None = 87.0,
    unit: tuple[str, str, str] = ("%", "UCUM", "%"),
    name: tuple[str, str, str] = ("111047", "DCM", "Probability of cancer"),
    finding_site: bool = True,
    qualitative: bool = True,
    tracking_identifier: str | None = "Nodule 1",
    study_group: bool = False,
    study_group_first: bool = False,
    extra_findings: Sequence[tuple[Any, tuple[float, float]]] = (),
    series_number: int = 9001,
    series_description: str = "TEST SR",
) -> Any:
    """A TID 1500 SR (highdicom) over the CT ``sources`` for experiments and tests.

    With ``image`` (one of ``sources``) and ``graphic_type`` ("POINT" or "CIRCLE"; ``center`` is
    (column, row) in pixels, SCOORD's order) it holds one TID 1410 planar ROI group: tracking
    identifier, finding (27925004, SCT, "Nodule"), finding site lung, SCOORD (111030, DCM, "Image
    Region") SELECTED FROM ``image`` (``scoord3d``: a SCOORD3D in the image's frame of reference
    instead, for ``sr_class="comprehensive3d"``), a NUM ``name`` = ``value`` ``unit`` and a malignancy CODE.
    ``extra_findings`` ((image, (column, row)) pairs) add more such groups, "Nodule 2"... .
    ``study_group`` adds (after it, or before with ``study_group_first``) a TID 1501 group without
    coordinates (NUM only); with ``graphic_type=None`` that group is the only one.
    """
    import numpy as np
    from highdicom.sr import (
        CodedConcept, Comprehensive3DSR, ComprehensiveSR, DeviceObserverIdentifyingAttributes, EnhancedSR,
        FindingSite, ImageRegion, ImageRegion3D, Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations,
        ObservationContext, ObserverContext, PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
        SourceImageForRegion, TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    nodule = CodedConcept("27925004", "SCT", "Nodule")
    lung = CodedConcept("39607008", "SCT", "Lung")
    malignancy = CodedConcept("RID36042", "RADLEX", "Malignancy")
    positive = CodedConcept("10828004", "SCT", "Positive")

    def common(identifier: str) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "tracking_identifier": TrackingIdentifier(uid=generate_uid(), identifier=identifier),
            "finding_type": nodule,
        }
        if finding_site:
            kw["finding_sites"] = [FindingSite(lung)]
        if value is not None:
            kw["measurements"] = [Measurement(name=CodedConcept(*name), value=value, unit=CodedConcept(*unit))]
        if qualitative:
            kw["qualitative_evaluations"] = [QualitativeEvaluation(name=malignancy, value=positive)]
        return kw

    groups: list[Any] = []
    findings = [(image, center, tracking_identifier)] if image is not None and graphic_type is not None else []
    findings += [(img, c, f"Nodule {k + 2}") for k, (img, c) in enumerate(extra_findings)]
    for image, center, identifier in findings:
        col, row = center if center is not None else (float(image.Columns) / 2, float(image.Rows) / 2)
        data = np.array([[col, row]]) if graphic_type == "POINT" else np.array([[col, row], [col + radius_px, row]])
        if scoord3d:  # patient coordinates (LPS mm) of the pixel positions, axial images assumed
            ipp = [float(v) for v in image.ImagePositionPatient]
            dy, dx = (float(v) for v in image.PixelSpacing)
            data = np.array([[ipp[0] + c * dx, ipp[1] + r * dy, ipp[2]] for c, r in data])
            region = ImageRegion3D(graphic_type=graphic_type, graphic_data=data,
                                   frame_of_reference_uid=image.FrameOfReferenceUID)
        else:
            region = ImageRegion(graphic_type=graphic_type, graphic_data=data,
                                 source_image=SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID))
        kw = common(identifier or "Nodule 1")
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **kw))
        if identifier is None:  # drop the TEXT (112039) item, keep the UIDREF
            items = groups[-1][0].ContentSequence
            groups[-1][0].ContentSequence = [i for i in items if i.ConceptNameCodeSequence[0].CodeValue != "112039"]
    if study_group or not groups:
        study = MeasurementsAndQualitativeEvaluations(**common("Study result"))
        groups = [study] + groups if study_group_first else groups + [study]
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="ainode test"),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("24627-2", "LN", "Chest CT"),
        imaging_measurements=groups,
        referenced_images=[f[0] for f in findings] or None,
    )
    cls = {"comprehensive": ComprehensiveSR, "enhanced": EnhancedSR, "comprehensive3d": Comprehensive3DSR}[sr_class]
    return cls(
        evidence=list(sources), content=report[0], series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="ainode tests",
        series_description=series_description, is_complete=True,
    )
