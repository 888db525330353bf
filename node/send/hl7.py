"""HL7 v2.5.1 ORU^R01: the result of one analysed study revision, to a RIS or worklist over MLLP.

The message is built and validated (STRICT, 2.5.1) with hl7apy; the MLLP client is
the socket module (hl7apy has an MLLP server only). One message per connection, an
original-mode ACK expected (MSH-15/16 empty): AA is success, AE/AR a refusal.

Layout (text from DICOM is HL7-escaped; times are UTC, ``YYYYMMDDHHMMSS+0000``):

==========  ==================================================================
MSH         MSH-3/4 sending application/facility, MSH-5/6 receiving, MSH-7 now,
            MSH-9 ``ORU^R01^ORU_R01``, MSH-10 control id, MSH-11 ``P``,
            MSH-12 ``2.5.1``, MSH-18 ``UNICODE UTF-8`` (the bytes are UTF-8)
PID         PID-1 ``1``, PID-3 ``id^^^issuer`` (issuer in CX.4 namespace ID; one
            longer than 20 characters goes in CX.4 universal ID, type ``ISO``
            when it is an OID, else ``L``), PID-5 the first (alphabetic) group of
            the DICOM PN as XPN (family^given^middle^suffix^prefix: DICOM's
            prefix and suffix swap places), PID-7 birth date, PID-8 sex.
            PID-3 and PID-5 are required by 2.5.1: when DICOM had none they are
            the HL7 null ``""``.
ORC         ORC-1 ``RE``, ORC-2/3 placer/filler order number = the accession
            number, or the Study Instance UID when there is none
OBR         OBR-1 ``1``, OBR-2/3 as ORC, OBR-4 ``AINODE-LUNG^AI lung CT
            analysis^99AINODE``, OBR-7 analysis time, OBR-18 the accession
            number (empty when none), OBR-22 now, OBR-24 ``CT``, OBR-25 ``P``
OBX         one per row below, OBX-11 ``P``, OBX-14 analysis time
==========  ==================================================================

OBX-3 is ``code^text^system``; OBX-8 is ``A`` (positive) or ``N`` (negative) on 1 and 2.

==  =====  ================  =====================  ========  ==============================
#   OBX-2  code              text                   system    OBX-5
==  =====  ================  =====================  ========  ==============================
1   NM     AINODE-PROB       Probability            99AINODE  score, 3 decimals; OBX-6
                                                              ``1^^UCUM``, OBX-7 ``<threshold``
2   ST     AINODE-RESULT     Result                 99AINODE  ``Positive`` / ``Negative``
3   NM     AINODE-THRESHOLD  Decision threshold     99AINODE  threshold; OBX-6 ``1^^UCUM``
4   NM     AINODE-FINDINGS   Located findings       99AINODE  number of located findings
5   ST     AINODE-MODEL      Model                  99AINODE  "model_name model_version"
6   TX     AINODE-NOTE       Disclaimer             99AINODE  :data:`DEMO_TEXT`
7   ST     110180            Study Instance UID     DCM       Study Instance UID
8   ST     112002            Series Instance UID    DCM       the SR's Series Instance UID
9   ST     AINODE-SR-SOP     SR SOP Instance UID    99AINODE  the SR's SOP Instance UID
10  ST     110181            SOP Class UID          DCM       the SR's SOP Class UID
11  ST     AINODE-PIPELINE   Pipeline               99AINODE  the pipeline (its called AE)
12  NM     AINODE-REVISION   Study revision         99AINODE  the revision analysed
==  =====  ================  =====================  ========  ==============================

``99AINODE`` is a local coding system (HL7 table 0396 ``99zzz``); ``DCM`` codes are
DICOM PS3.16 (CID 10001 "UID Types", CID 404); DCM has no code for a SOP Instance UID.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.exceptions import HL7apyException, UnsupportedVersion
from hl7apy.parser import parse_message

from node.results.facts import DEMO_NOTICE
from node.send.delivery import Delivery, SendError

logger = logging.getLogger(__name__)

VERSION = "2.5.1"
DEMO_TEXT = DEMO_NOTICE  # said in words by every result, this message too
LOCAL = "99AINODE"  # the local coding system of the codes below
SERVICE = ("AINODE-LUNG", "AI lung CT analysis", LOCAL)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ANSWER_BYTES = 1 << 20

ACCEPTED = ("AA", "CA")
REFUSED = ("AE", "AR", "CE", "CR")
SUCCESS = 0

FIELD, COMPONENT, REPETITION, ESCAPE, SUBCOMPONENT = "|", "^", "~", "\\", "&"
_ESCAPES = {FIELD: "F", COMPONENT: "S", SUBCOMPONENT: "T", REPETITION: "R", ESCAPE: "E"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_ESCAPE_SEQUENCE = re.compile(r"\\([^\\]*)\\")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DATE = re.compile(r"^[0-9]{4}([0-9]{2}([0-9]{2})?)?$")
HD_NAMESPACE_MAX = 20  # HD.1 is IS(20) in 2.5.1


@dataclass(frozen=True)
class Report:
    """What the ORU^R01 says about one analysed study revision (values as the PACS sent them in the DICOM headers)."""

    study_uid: str
    accession_number: str  # may be ""
    patient_id: str  # may be ""
    issuer_of_patient_id: str  # may be ""
    patient_name: str  # DICOM PN as sent, e.g. "DOE^JOHN"; may be ""
    patient_birth_date: str  # YYYYMMDD or ""
    patient_sex: str  # M/F/O or ""
    score: float  # probability 0..1
    threshold: float
    positive: bool
    findings: int  # located findings reported
    model_name: str
    model_version: str
    sr_series_uid: str
    sr_sop_uid: str
    sr_sop_class: str
    pipeline: str  # the ainode pipeline (its called AE title), e.g. "AI_LUNG"
    revision: int
    observed_at: float  # epoch seconds of the analysis


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1: AA, AE, AR (or CA/CE/CR)
    control_id: str  # MSA-2
    text: str  # MSA-3 and/or ERR text, "" if none


def escape(text: str) -> str:
    """``text`` with the HL7 delimiters and control characters written as escape sequences."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(f"\\{_ESCAPES[ch]}\\")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\X{ord(ch):02X}\\")
        else:
            out.append(ch)
    return "".join(out)


def unescape(text: str) -> str:
    """The text an escaped HL7 value stands for (``\\F\\`` -> ``|``, ``\\X0D\\`` -> CR, ``\\.br\\`` -> LF)."""

    def one(match: re.Match[str]) -> str:
        seq = match.group(1)
        if seq in _UNESCAPES:
            return _UNESCAPES[seq]
        if seq.startswith("X") and re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", seq):
            return bytes.fromhex(seq[1:]).decode("utf-8", errors="replace")
        if seq == ".br":
            return "\n"
        return ""  # highlighting (\H\, \N\) and formatting commands

    return _ESCAPE_SEQUENCE.sub(one, text)


def _components(*values: str, sep: str = COMPONENT) -> str:
    """Escaped values joined by ``sep``, trailing empty ones left out."""
    parts = [escape(v) for v in values]
    while parts and not parts[-1]:
        parts.pop()
    return sep.join(parts)


def _hl7_time(epoch: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch)) + "+0000"


def _decimal(value: float) -> str:
    """A number as HL7 NM: plain decimal notation, no exponent, no trailing zeros."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _patient_name(pn: str) -> str:
    """The XPN of a DICOM PN: its alphabetic group, prefix and suffix in XPN order."""
    family, given, middle, prefix, suffix = (pn.split("=", 1)[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in (family, given, middle, prefix, suffix))
    return _components(family, given, middle, suffix, prefix)


def _patient_id(patient_id: str, issuer: str) -> str:
    """PID-3 (CX): the ID with its issuer as assigning authority (CX.4)."""
    if not issuer:
        return escape(patient_id)
    if len(escape(issuer)) <= HD_NAMESPACE_MAX:
        authority = escape(issuer)
    else:
        kind = "ISO" if _OID.match(issuer) else "L"
        authority = _components("", issuer, kind, sep=SUBCOMPONENT)
    return f"{escape(patient_id)}^^^{authority}"


def _set(segment: Segment, field: str, value: str) -> None:
    """Set one field from its ER7 text; an empty value leaves the field out."""
    if not value:
        return
    try:
        setattr(segment, field, value)
    except HL7apyException as e:
        raise ValueError(f"HL7 {field.upper().replace('_', '-')}: {value!r} is not valid in {VERSION}: {e}") from None


def _observations(report: Report) -> list[tuple[str, tuple[str, str, str], str, dict[str, str]]]:
    """(value type, identifier, escaped OBX-5, other OBX fields) per OBX, in order."""
    flag = "A" if report.positive else "N"
    unit = "1^^UCUM"
    model = " ".join(p for p in (report.model_name.strip(), report.model_version.strip()) if p)
    return [
        ("NM", ("AINODE-PROB", "Probability", LOCAL), f"{report.score:.3f}",
         {"obx_6": unit, "obx_7": escape(f"<{_decimal(report.threshold)}"), "obx_8": flag}),
        ("ST", ("AINODE-RESULT", "Result", LOCAL), "Positive" if report.positive else "Negative", {"obx_8": flag}),
        ("NM", ("AINODE-THRESHOLD", "Decision threshold", LOCAL), _decimal(report.threshold), {"obx_6": unit}),
        ("NM", ("AINODE-FINDINGS", "Located findings", LOCAL), str(report.findings), {}),
        ("ST", ("AINODE-MODEL", "Model", LOCAL), escape(model), {}),
        ("TX", ("AINODE-NOTE", "Disclaimer", LOCAL), escape(DEMO_TEXT), {}),
        ("ST", ("110180", "Study Instance UID", "DCM"), escape(report.study_uid), {}),
        ("ST", ("112002", "Series Instance UID", "DCM"), escape(report.sr_series_uid), {}),
        ("ST", ("AINODE-SR-SOP", "SR SOP Instance UID", LOCAL), escape(report.sr_sop_uid), {}),
        ("ST", ("110181", "SOP Class UID", "DCM"), escape(report.sr_sop_class), {}),
        ("ST", ("AINODE-PIPELINE", "Pipeline", LOCAL), escape(report.pipeline), {}),
        ("NM", ("AINODE-REVISION", "Study revision", LOCAL), str(report.revision), {}),
    ]


def build_oru(
    report: Report, *, control_id: str, sending_application: str, sending_facility: str = "",
    receiving_application: str = "", receiving_facility: str = "", now: float | None = None,
) -> str:
    """The ORU^R01 as ER7 text (segments joined by \\r), validated as 2.5.1 by hl7apy before it is returned.

    Raises ValueError, naming the argument or the HL7 field, when the report cannot be
    written as valid 2.5.1 (an empty control id, a score outside 0..1, a value too long).
    """
    if not isinstance(report, Report):
        raise TypeError('Argument "report" must be a Report.')
    if not control_id:
        raise ValueError('Argument "control_id" must not be empty.')
    if not sending_application:
        raise ValueError('Argument "sending_application" must not be empty.')
    if not report.study_uid:
        raise ValueError('Argument "report" must have a study_uid.')
    if not 0.0 <= report.score <= 1.0:
        raise ValueError(f'Argument "report" has score {report.score!r}, not a probability in 0..1.')
    stamp = _hl7_time(time.time() if now is None else now)
    observed = _hl7_time(report.observed_at)
    order = escape(report.accession_number or report.study_uid)

    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    _set(msh, "msh_3", escape(sending_application))
    _set(msh, "msh_4", escape(sending_facility))
    _set(msh, "msh_5", escape(receiving_application))
    _set(msh, "msh_6", escape(receiving_facility))
    _set(msh, "msh_7", stamp)
    _set(msh, "msh_9", "ORU^R01^ORU_R01")
    _set(msh, "msh_10", escape(control_id))
    _set(msh, "msh_11", "P")
    _set(msh, "msh_12", VERSION)
    _set(msh, "msh_18", "UNICODE UTF-8")

    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    _set(pid, "pid_1", "1")
    _set(pid, "pid_3", _patient_id(report.patient_id, report.issuer_of_patient_id) if report.patient_id else '""')
    _set(pid, "pid_5", _patient_name(report.patient_name) or '""')
    birth = report.patient_birth_date.strip()
    _set(pid, "pid_7", birth if _DATE.match(birth) else "")
    sex = report.patient_sex.strip().upper()
    _set(pid, "pid_8", sex if sex in ("M", "F", "O") else "")

    group = result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = group.orc
    _set(orc, "orc_1", "RE")
    _set(orc, "orc_2", order)
    _set(orc, "orc_3", order)
    obr = group.obr
    _set(obr, "obr_1", "1")
    _set(obr, "obr_2", order)
    _set(obr, "obr_3", order)
    _set(obr, "obr_4", _components(*SERVICE))
    _set(obr, "obr_7", observed)
    _set(obr, "obr_18", escape(report.accession_number))
    _set(obr, "obr_22", stamp)
    _set(obr, "obr_24", "CT")
    _set(obr, "obr_25", "P")

    for number, (value_type, code, value, extra) in enumerate(_observations(report), start=1):
        obx = group.add_group("ORU_R01_OBSERVATION").obx
        _set(obx, "obx_1", str(number))
        _set(obx, "obx_2", value_type)
        _set(obx, "obx_3", _components(*code))
        _set(obx, "obx_5", value)
        for field, text in extra.items():
            _set(obx, field, text)
        _set(obx, "obx_11", "P")
        _set(obx, "obx_14", observed)
    try:
        msg.validate()
    except HL7apyException as e:
        raise ValueError(f"Study {report.study_uid}: the ORU^R01 is not valid HL7 {VERSION}: {e}") from None
    return str(msg.to_er7())


def _field_texts(segment: Segment) -> dict[str, str]:
    """ER7 text of each field present in a parsed segment, by name ("MSA_1")."""
    return {str(f.name): str(f.to_er7()) for f in segment.children}


def _err_text(fields: dict[str, str]) -> str:
    """The words of one ERR segment: ERR-8 user message, else the text of ERR-3 (2.5+) or ERR-1 (2.3)."""
    if fields.get("ERR_8"):
        return unescape(fields["ERR_8"])
    if fields.get("ERR_3"):
        parts = fields["ERR_3"].split(COMPONENT)
        return unescape(parts[1] if len(parts) > 1 and parts[1] else parts[0])
    if fields.get("ERR_1"):
        parts = fields["ERR_1"].split(REPETITION)[0].split(COMPONENT)
        if len(parts) > 3:
            code = parts[3].split(SUBCOMPONENT)
            return unescape(code[1] if len(code) > 1 and code[1] else code[0])
    return ""


def parse_ack(text: str) -> Ack:
    """MSA-1, MSA-2 and the reason words of an HL7 acknowledgment of any version; ValueError if it is none."""
    try:
        msg = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except UnsupportedVersion:
        # An ACK of a version hl7apy does not know (2.9, none): MSA and ERR read the same as 2.5.1.
        msh, sep, rest = text.partition("\r")
        fields = msh.split(msh[3:4] or FIELD)
        fields += [""] * (12 - len(fields))
        fields[11] = VERSION
        try:
            msg = parse_message((msh[3:4] or FIELD).join(fields) + sep + rest,
                                validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
        except HL7apyException as e:
            raise ValueError(f"not an HL7 message ({e})") from None
    except HL7apyException as e:
        raise ValueError(f"not an HL7 message ({e})") from None
    segments = [(str(s.name), _field_texts(s)) for s in msg.children]
    msa = next((f for name, f in segments if name == "MSA"), None)
    if msa is None or not msa.get("MSA_1"):
        raise ValueError("no MSA segment with an acknowledgment code")
    reasons = [unescape(msa.get("MSA_3", ""))] + [_err_text(f) for name, f in segments if name == "ERR"]
    words = "; ".join(dict.fromkeys(r.strip() for r in reasons if r.strip()))
    return Ack(code=msa["MSA_1"].strip().upper(), control_id=unescape(msa.get("MSA_2", "")).strip(), text=words)


def send_message(
    message: str, host: str, port: int, *, timeout: float,
    ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
) -> Ack:
    """Send one message over MLLP and read its ACK.

    ``timeout`` bounds the connection (with the TLS handshake), and again the wait for
    the whole answer. Raises SendError (one line naming host:port) when there is no
    connection, a timeout, a closed connection, an answer that is not an MLLP frame or
    an ACK that does not parse.
    """
    if timeout <= 0:
        raise ValueError('Argument "timeout" must be positive.')
    where = f"HL7 {host}:{port}{' (TLS)' if ssl_context is not None else ''}"
    if not message.endswith("\r"):
        message += "\r"
    frame = START_BLOCK + message.encode("utf-8") + END_BLOCK
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise SendError(f"{where}: no connection: {e.strerror or e}") from None
    try:
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
            except (ssl.SSLError, ssl.CertificateError) as e:
                raise SendError(f"{where}: TLS handshake failed: {getattr(e, 'reason', None) or e}") from None
            except OSError as e:
                raise SendError(f"{where}: TLS handshake failed: {e.strerror or e}") from None
        try:
            sock.sendall(frame)
            answer = _read_frame(sock, time.monotonic() + timeout, where)
        except socket.timeout:
            raise SendError(f"{where}: no answer within {timeout:g} s") from None
        except OSError as e:
            raise SendError(f"{where}: connection failed: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        return parse_ack(answer.decode("utf-8", errors="replace"))
    except ValueError as e:
        raise SendError(f"{where}: the answer is not an HL7 ACK: {e}") from None


def _read_frame(sock: socket.socket, deadline: float, where: str) -> bytes:
    """The message in the MLLP frame the peer sends before ``deadline``."""
    data = bytearray()
    while END_BLOCK not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            what = "before answering" if not data else f"after {len(data)} bytes of an unfinished frame"
            raise SendError(f"{where}: the peer closed the connection {what}")
        data += chunk
        if not data.startswith(START_BLOCK):
            raise SendError(f"{where}: the answer is not an MLLP frame (starts with {bytes(data[:16])!r})")
        if len(data) > MAX_ANSWER_BYTES:
            raise SendError(f"{where}: the answer is longer than {MAX_ANSWER_BYTES} bytes without an MLLP end")
    return bytes(data[1:data.index(END_BLOCK)])


def deliver(
    report: Report, host: str, port: int, *, control_id: str, timeout: float, sending_application: str,
    sending_facility: str = "", receiving_application: str = "", receiving_facility: str = "",
    ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
) -> Delivery:
    """Build the ORU^R01, send it and check the ACK.

    AA (or CA) is success: ``Delivery(0, seconds, (0,))``. AE/AR (CE/CR) raise
    SendError("... answered AR: <reason>"); so does an ACK for another control id.
    """
    message = build_oru(
        report, control_id=control_id, sending_application=sending_application, sending_facility=sending_facility,
        receiving_application=receiving_application, receiving_facility=receiving_facility,
    )
    where = f"HL7 {host}:{port}{' (TLS)' if ssl_context is not None else ''}"
    started = time.monotonic()
    ack = send_message(message, host, port, timeout=timeout, ssl_context=ssl_context, server_hostname=server_hostname)
    seconds = time.monotonic() - started
    reason = ack.text or "no reason given"
    if ack.control_id != control_id:
        raise SendError(f"{where} answered {ack.code} for message {ack.control_id!r}, not {control_id!r}: {reason}")
    if ack.code in REFUSED:
        raise SendError(f"{where} answered {ack.code}: {reason}")
    if ack.code not in ACCEPTED:
        raise SendError(f"{where} answered an unknown acknowledgment code {ack.code!r}: {reason}")
    logger.info("Study %s: ORU^R01 %s (revision %d) accepted by %s in %.2f s",
                report.study_uid, control_id, report.revision, where, seconds)
    return Delivery(SUCCESS, seconds, (SUCCESS,))
