"""STOW-RS: Part 10 files to a DICOMweb archive, in bounded batches (dicomweb-client over requests).

Each batch is one ``POST {url}/studies`` (no study UID in the path, so one batch may span
studies) of at most :data:`MAX_BATCH_BYTES` of files and :data:`MAX_BATCH_INSTANCES`
instances. The files are read with pydicom and written back by dicomweb-client unchanged:
their transfer syntax is kept and encapsulated (compressed) pixel data travels as it is.
"""

from __future__ import annotations

import logging
import socket
import ssl
import stat
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import requests
import requests.auth

from node.config import Destination
from node.send.delivery import Delivery, SendError

if TYPE_CHECKING:
    from pydicom import Dataset

logger = logging.getLogger(__name__)

MAX_BATCH_BYTES = 64 * 2**20  # files per request body, about; a larger file goes alone
MAX_BATCH_INSTANCES = 100

SUCCESS = 0x0000
WARNING = 0xB000  # stored with a warning whose reason the archive did not give as a code

FAILURE_REASONS = {  # PS3.18 table 10.5.3-1 / PS3.4 C-STORE statuses an archive may report
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
}
_MAX_LISTED = 5  # failed instances named in one error message


def credentials_problem(dest: Destination) -> str | None:
    """Why ``dest.auth_file`` cannot be used (missing, unreadable, empty, not one line), or None.

    The file holds one line: ``user:password`` (a line with a ``:``) for HTTP basic
    auth, else a bearer token. A file that its group or others may read is usable:
    that is logged as a warning. The answer never includes the secret.
    """
    return _read_auth_line(dest)[0]


def stow(paths: Sequence[Path], dest: Destination, timeout: float) -> Delivery:
    """STOW-RS of Part 10 files to ``dest.url``; one status per file, in order.

    Statuses: ``0x0000`` stored, ``0xBxxx`` stored with the warning the archive
    reported (:data:`WARNING` where it gave none). Anything else (an HTTP error, a
    failed instance, no connection, no answer within ``timeout`` seconds to connect or
    between reads) raises SendError with one line naming the destination. The
    ``auth_file`` is read at every call.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError('Argument "paths" must name at least one file.')
    if timeout <= 0:
        raise ValueError(f'Argument "timeout" must be positive, not {timeout!r}.')
    where = f"{dest.name} ({dest.url})"
    problem, line = _read_auth_line(dest)
    if problem is not None:
        raise SendError(f"{where}: {problem}")
    groups = batches(files, MAX_BATCH_BYTES, MAX_BATCH_INSTANCES)
    started = time.monotonic()
    statuses: list[int] = []
    with _StowSession(dest.ca or True) as session:
        session.auth = _auth(line)
        session.headers["Accept"] = "application/dicom+json"
        client = _client(dest, session, timeout, where)
        for number, group in enumerate(groups, 1):
            logger.debug("%s: STOW-RS request %d of %d: %d instance(s)", where, number, len(groups), len(group))
            try:
                statuses += _stow_batch(client, session, group, where, timeout)
            except SendError as exc:
                if statuses:
                    raise SendError(f"{exc} ({len(statuses)} of {len(files)} instances stored before)") from exc
                raise
    seconds = time.monotonic() - started
    for path, code in zip(files, statuses):
        if code != SUCCESS:
            logger.warning("%s: %s stored with warning 0x%04X", where, path.name, code)
    logger.info("%s: STOW-RS stored %d instance(s) in %d request(s), %.2f s", where, len(files), len(groups), seconds)
    return Delivery(statuses[-1], seconds, tuple(statuses))


def probe(dest: Destination, timeout: float) -> tuple[bool, str]:
    """Whether the archive answers a QIDO-RS search (``GET <url>/studies?limit=1``) with these
    credentials, and what happened in words (``ainode dest echo``); never the secret."""
    problem, line = _read_auth_line(dest)
    if problem is not None:
        return False, problem
    with _StowSession(dest.ca or True) as session:
        session.auth = _auth(line)
        try:
            rsp = session.get(f"{dest.url}/studies", params={"limit": "1"}, timeout=(timeout, timeout),
                              headers={"Accept": "application/dicom+json"})
        except requests.RequestException as exc:
            return False, f"QIDO-RS failed: {_connection_cause(exc, timeout)}"
    ok = rsp.status_code in (200, 204)
    return ok, f"QIDO-RS answered {_http_status(rsp)}"


def batches(files: Sequence[Path], max_bytes: int, max_count: int) -> list[list[Path]]:
    """The files in order, grouped into runs of at most ``max_count`` files and ``max_bytes``
    bytes (a file larger than ``max_bytes`` is a run of its own)."""
    out: list[list[Path]] = []
    size = 0
    for path in files:
        n = path.stat().st_size
        if not out or len(out[-1]) >= max_count or size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(path)
        size += n
    return out


# --------------------------------------------------------------------------- credentials


def _read_auth_line(dest: Destination) -> tuple[str | None, str]:
    """(the problem with ``dest.auth_file`` or None, its line); (None, "") where there is none."""
    if not dest.auth_file:
        return None, ""
    path = Path(dest.auth_file)
    name = f"auth_file {path}"
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            return f"{name} is not a file", ""
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{name} does not exist", ""
    except PermissionError:
        return f"{name} cannot be read (permission denied)", ""
    except OSError as exc:
        return f"{name} cannot be read ({exc.strerror or type(exc).__name__})", ""
    except UnicodeDecodeError:
        return f"{name} is not UTF-8 text", ""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if not lines:
        return f"{name} is empty", ""
    if len(lines) > 1:
        return f"{name} holds {len(lines)} lines; it must hold one: a bearer token or user:password", ""
    line = lines[0]
    if ":" in line:
        if not line.partition(":")[0]:
            return f"{name}: the user name before ':' is empty", ""
    elif not all(33 <= ord(c) <= 126 for c in line):
        return f"{name}: the bearer token holds characters that cannot go in an HTTP header", ""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s can be read by its group or others (mode %03o); make it 0600", name, mode & 0o777)
    return None, line


def _auth(line: str) -> requests.auth.AuthBase | None:
    """The requests auth for an auth_file line: basic for ``user:password``, else bearer; None for ""."""
    if not line:
        return None
    if ":" in line:
        user, _, password = line.partition(":")
        return requests.auth.HTTPBasicAuth(user.encode("utf-8"), password.encode("utf-8"))
    return _BearerAuth(line)


class _BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on every request."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<token>)"


# --------------------------------------------------------------------------- HTTP


class _StowSession(requests.Session):
    """A requests session for one stow.

    ``verify`` goes with every request, so a ``REQUESTS_CA_BUNDLE`` in the environment
    cannot replace the destination's ``ca``; the ``Host`` header dicomweb-client sets
    (without the port) is dropped so requests writes the right one; the last answer is kept.
    """

    def __init__(self, verify: str | bool) -> None:
        super().__init__()
        self.verify = verify
        self.last: requests.Response | None = None

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("verify", self.verify)
        if kwargs.get("headers"):
            kwargs["headers"] = {k: v for k, v in kwargs["headers"].items() if k.lower() != "host"}
        self.last = None
        self.last = super().request(method, url, *args, **kwargs)
        return self.last


def _client(dest: Destination, session: _StowSession, timeout: float, where: str) -> Any:
    from dicomweb_client import DICOMwebClient

    try:
        # chunk_size: the whole body with a Content-Length, never chunked transfer encoding
        client = DICOMwebClient(url=dest.url, session=session, timeout=(timeout, timeout), chunk_size=sys.maxsize)
    except ValueError as exc:
        raise SendError(f"{where}: not a usable DICOMweb URL ({exc})") from exc
    client.set_http_retry_params(retry=False)  # the send job retries, with its own back-off
    return client


def _stow_batch(client: Any, session: _StowSession, files: list[Path], where: str, timeout: float) -> list[int]:
    """POST one batch; its statuses in order, or SendError."""
    from pydicom import dcmread

    datasets = [dcmread(p) for p in files]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        client.store_instances(datasets)
    except requests.HTTPError as exc:
        rsp = exc.response if exc.response is not None else session.last
        raise _http_error(rsp, uids, where) from None
    except requests.RequestException as exc:
        if session.last is None:  # no answer: no connection, TLS, timeout
            raise SendError(f"{where}: STOW-RS failed: {_connection_cause(exc, timeout)}") from None
        raise SendError(f"{where}: STOW-RS answer unreadable ({type(exc).__name__})") from None
    except ValueError as exc:  # the answer's JSON or XML did not parse
        raise SendError(f"{where}: STOW-RS answer unreadable ({exc})") from None
    answer = _answer_dataset(session.last)
    if answer is None:
        raise SendError(f"{where}: STOW-RS answered {_http_status(session.last)} without a DICOM JSON response")
    stored, failed = _referenced(answer), _failed(answer)
    missing = [u for u in uids if u not in stored and u not in failed]
    if failed or missing:
        raise SendError(f"{where}: STOW-RS answered {_http_status(session.last)}; {_listing(uids, failed, missing)}")
    return [stored[u] for u in uids]


def _http_error(rsp: requests.Response | None, uids: list[str], where: str) -> SendError:
    """The SendError for an HTTP error answer, with what its response dataset says if it has one."""
    message = f"{where}: STOW-RS answered {_http_status(rsp)}"
    answer = _answer_dataset(rsp)
    if answer is not None:
        stored, failed = _referenced(answer), _failed(answer)
        missing = [u for u in uids if u not in stored and u not in failed]
        if failed or stored:
            message += f"; {_listing(uids, failed, missing)}"
    return SendError(message)


def _http_status(rsp: requests.Response | None) -> str:
    if rsp is None:
        return "nothing"
    try:
        phrase = HTTPStatus(rsp.status_code).phrase
    except ValueError:
        phrase = rsp.reason or ""
    return f"{rsp.status_code} {phrase}".rstrip()


def _answer_dataset(rsp: requests.Response | None) -> Dataset | None:
    """The STOW-RS response dataset of an answer (DICOM JSON, whatever its Content-Type says:
    Orthanc sends error bodies without one), or None."""
    from pydicom import Dataset

    if rsp is None or not rsp.content or not rsp.content.lstrip().startswith(b"{"):
        return None
    try:
        return Dataset.from_json(rsp.content.decode("utf-8"))
    except (ValueError, TypeError, KeyError):
        return None


def _referenced(answer: Dataset) -> dict[str, int]:
    """SOP Instance UID -> status of each item of the ReferencedSOPSequence."""
    out = {}
    for item in answer.get("ReferencedSOPSequence", []):
        reason = item.get("WarningReason")
        out[str(item.get("ReferencedSOPInstanceUID", ""))] = SUCCESS if reason is None else (int(reason) or WARNING)
    return out


def _failed(answer: Dataset) -> dict[str, int | None]:
    """SOP Instance UID -> FailureReason of each item of the FailedSOPSequence."""
    out: dict[str, int | None] = {}
    for item in answer.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        out[str(item.get("ReferencedSOPInstanceUID", ""))] = None if reason is None else int(reason)
    return out


def _listing(uids: list[str], failed: dict[str, int | None], missing: list[str]) -> str:
    """'failed: UID (0x0110 processing failure), ...; not in the answer: UID' for one message."""
    def reason(code: int | None) -> str:
        return "no reason given" if code is None else f"0x{code:04X} {FAILURE_REASONS.get(code, '')}".rstrip()

    parts = []
    if failed:
        named = [f"{u} ({reason(c)})" for u, c in list(failed.items())[:_MAX_LISTED]]
        more = f" and {len(failed) - _MAX_LISTED} more" if len(failed) > _MAX_LISTED else ""
        parts.append(f"{len(failed)} of {len(uids)} failed: {', '.join(named)}{more}")
    if missing:
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        parts.append(f"{len(missing)} of {len(uids)} not in the answer: {', '.join(missing[:_MAX_LISTED])}{more}")
    return "; ".join(parts)


def _connection_cause(exc: BaseException, timeout: float) -> str:
    """Why a request got no answer, in words (refused, timed out, TLS verification...)."""
    import urllib3.exceptions

    causes = list(_chain(exc))
    for e in causes:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verify failed: {e.verify_message or e.reason}"
    for e in causes:
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed: {e.reason or e}"
    for e in causes:  # before timeouts: urllib3's NewConnectionError is a ConnectTimeoutError too
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"host name not resolved ({e.strerror})"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the peer"
    if isinstance(exc, requests.ConnectTimeout):
        return f"no connection within {timeout:g} s (connect timed out)"
    if isinstance(exc, requests.ReadTimeout):
        return f"no answer within {timeout:g} s (read timed out)"
    for e in causes:
        if isinstance(e, (TimeoutError, urllib3.exceptions.TimeoutError)):
            return f"timed out after {timeout:g} s"
    for e in causes:
        if isinstance(e, urllib3.exceptions.ProtocolError):
            return "connection closed by the peer without an answer"
        if isinstance(e, OSError) and e.strerror:
            return str(e.strerror)
    return type(exc).__name__


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and every exception it wraps (causes, contexts, urllib3 reasons, args)."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        yield e
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
