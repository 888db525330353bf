"""ORU^R01 over MLLP to a real peer: hl7apy's MLLPServer on 127.0.0.1 (plain and TLS)."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from node.send.delivery import SendError
from node.send.hl7 import DEMO_TEXT, Report, build_oru, deliver, unescape
from tests.peers import free_port, serving

ORU = "ORU^R01^ORU_R01"
SR_SOP = "1.2.826.0.1.3680043.8.498.77"

REPORT = Report(
    study_uid="1.2.826.0.1.3680043.8.498.11",
    accession_number="ACC0042",
    patient_id="PAT123",
    issuer_of_patient_id="HOSP",
    patient_name="DOE^JOHN",
    patient_birth_date="19600131",
    patient_sex="M",
    score=0.97325,
    threshold=0.5,
    positive=True,
    findings=2,
    model_name="lungnet",
    model_version="0.3",
    sr_series_uid="1.2.826.0.1.3680043.8.498.55",
    sr_sop_uid=SR_SOP,
    sr_sop_class="1.2.840.10008.5.1.4.1.1.88.33",
    pipeline="AI_LUNG",
    revision=1,
    observed_at=1_700_000_000.0,
)


def _frame(text: str) -> str:
    return "\x0b" + text + "\x1c\x0d"


def _ack(incoming: str, code: str, text: str = "", control_id: str | None = None) -> str:
    """An original-mode ACK (2.5.1) to ``incoming``, built with hl7apy."""
    msh = parse_message(incoming, find_groups=False).msh
    ack = Message("ACK", version="2.5.1")
    ack.msh.msh_3 = "RIS"
    ack.msh.msh_5 = msh.msh_3.to_er7()
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = "RIS1"
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = msh.msh_10.to_er7() if control_id is None else control_id
    if text:
        ack.add_segment("ERR")
        ack.err.err_3 = "207^Application internal error^HL70357"
        ack.err.err_4 = "E"
        ack.err.err_8 = text
    return str(ack.to_er7())


class Answer(AbstractHandler):
    """Records the message and answers as told: (code, text, control id or None for the message's)."""

    def __init__(self, message: str, received: list[str], answer: tuple[str, str, str | None]) -> None:
        super().__init__(message)
        self.received = received
        self.answer = answer

    def reply(self) -> str:
        self.received.append(self.incoming_message)
        code, text, control_id = self.answer
        return _frame(_ack(self.incoming_message, code, text, control_id))


class Raw(AbstractHandler):
    """Answers with the bytes it is given, as they are (not necessarily MLLP)."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw

    def reply(self) -> str:
        return self.raw


class TLSMLLPServer(MLLPServer):
    """hl7apy's MLLPServer with each accepted connection wrapped in TLS."""

    def __init__(self, *args: Any, context: ssl.SSLContext, **kwargs: Any) -> None:
        self.context = context
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(5)
        return self.context.wrap_socket(sock, server_side=True), addr


@contextmanager
def mllp_server(handler: type, *args: Any, context: ssl.SSLContext | None = None) -> Iterator[int]:
    """An MLLPServer in a thread on a free loopback port, answering ORU^R01 with ``handler``; yields the port."""
    port = free_port()
    handlers = {ORU: (handler, *args)}
    server = (MLLPServer("127.0.0.1", port, handlers, timeout=5) if context is None
              else TLSMLLPServer("127.0.0.1", port, handlers, timeout=5, context=context))
    with serving(server):
        yield port


def _deliver(port: int, report: Report = REPORT, control_id: str = "MSG0001", **kwargs: Any) -> Any:
    return deliver(report, "127.0.0.1", port, control_id=control_id, timeout=5, sending_application="AINODE",
                   receiving_application="RIS", receiving_facility="HOSP", **kwargs)


def _obx(message: Any, code: str) -> Any:
    """The OBX whose OBX-3.1 is ``code``."""
    group = message.oru_r01_patient_result.oru_r01_order_observation
    found = [g.obx for g in group.oru_r01_observation if g.obx.obx_3.obx_3_1.to_er7() == code]
    assert len(found) == 1, f"expected one OBX {code}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("positive, flag, words", [(True, "A", "Positive"), (False, "N", "Negative")])
def test_oru_arrives_valid_with_the_result(positive: bool, flag: str, words: str) -> None:
    received: list[str] = []
    with mllp_server(Answer, received, ("AA", "", None)) as port:
        delivery = _deliver(port, dataclasses.replace(REPORT, positive=positive))
    assert delivery.status == 0 and delivery.statuses == (0,) and delivery.seconds >= 0
    assert len(received) == 1
    msg = parse_message(received[0], validation_level=VALIDATION_LEVEL.STRICT)
    assert msg.validate() is True
    assert msg.msh.msh_9.to_er7() == ORU and msg.msh.msh_12.to_er7() == "2.5.1"
    assert msg.msh.msh_10.to_er7() == "MSG0001"
    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.cx_1.to_er7() == "PAT123" and pid.pid_3.cx_4.to_er7() == "HOSP"
    assert pid.pid_5.to_er7() == "DOE^JOHN"
    order = result.oru_r01_order_observation
    assert order.orc.orc_1.to_er7() == "RE"
    assert order.obr.obr_18.to_er7() == "ACC0042" and order.obr.obr_3.to_er7() == "ACC0042"
    assert order.obr.obr_25.to_er7() == "P"
    prob = _obx(msg, "AINODE-PROB")
    assert prob.obx_2.to_er7() == "NM" and prob.obx_5.to_er7() == "0.973" and prob.obx_8.to_er7() == flag
    result_obx = _obx(msg, "AINODE-RESULT")
    assert result_obx.obx_5.to_er7() == words and result_obx.obx_8.to_er7() == flag
    assert _obx(msg, "AINODE-THRESHOLD").obx_5.to_er7() == "0.5"
    assert _obx(msg, "AINODE-FINDINGS").obx_5.to_er7() == "2"
    assert _obx(msg, "AINODE-NOTE").obx_5.to_er7() == DEMO_TEXT
    assert _obx(msg, "AINODE-SR-SOP").obx_5.to_er7() == SR_SOP
    assert _obx(msg, "110180").obx_5.to_er7() == REPORT.study_uid
    statuses = {g.obx.obx_11.to_er7() for g in order.oru_r01_observation}
    assert statuses == {"P"}


@pytest.mark.parametrize("code", ["AR", "AE"])
def test_refusal_raises_with_code_and_reason(code: str) -> None:
    with mllp_server(Answer, [], (code, "unknown order ACC0042", None)) as port:
        with pytest.raises(SendError) as err:
            _deliver(port)
    assert f"answered {code}" in str(err.value) and "unknown order ACC0042" in str(err.value)
    assert f"127.0.0.1:{port}" in str(err.value)


def test_ack_for_another_control_id_raises() -> None:
    with mllp_server(Answer, [], ("AA", "", "SOMEONE-ELSE")) as port:
        with pytest.raises(SendError, match="SOMEONE-ELSE"):
            _deliver(port)


def test_no_listener_fails_fast_naming_host_and_port() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(SendError, match=f"127.0.0.1:{port}.*no connection"):
        _deliver(port)
    assert time.monotonic() - started < 3


def test_silent_peer_times_out() -> None:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # connections complete in the backlog; nobody ever answers
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SendError, match=f"127.0.0.1:{port}.*no answer within 1 s"):
            deliver(REPORT, "127.0.0.1", port, control_id="T1", timeout=1.0, sending_application="AINODE")
        assert 0.9 <= time.monotonic() - started < 4


@pytest.mark.parametrize("ack, outcome", [
    ("MSH|^~\\&|RIS||AINODE||20240101||ACK|R1|P|2.3\rMSA|AR|MSG0001|Rejected\r"
     "ERR|PID^1^3^101&Required field missing&HL70357", "answered AR: Rejected; Required field missing"),
    ("MSH|^~\\&|RIS||AINODE||20240101||ACK|R1|P|2.9\rMSA|AE|MSG0001|Cannot \\T\\ will not",
     "answered AE: Cannot & will not"),
    ("MSH|^~\\&|RIS||AINODE||20240101||ACK|R1|P|2.9\rMSA|AA|MSG0001", None),
    ("MSH|^~\\&|RIS||AINODE||20240101||ACK|R1|P|2.3\rMSA|CA|MSG0001\r", None),
])
def test_acks_of_other_versions(ack: str, outcome: str | None) -> None:
    with mllp_server(Raw, _frame(ack)) as port:
        if outcome is None:
            assert _deliver(port).status == 0
        else:
            with pytest.raises(SendError, match=outcome):
                _deliver(port)


def test_answer_not_mllp_raises() -> None:
    with mllp_server(Raw, "HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        with pytest.raises(SendError, match="not an MLLP frame"):
            _deliver(port)


def test_answer_not_hl7_raises() -> None:
    with mllp_server(Raw, _frame("hello")) as port:
        with pytest.raises(SendError, match="not an HL7 ACK"):
            _deliver(port)


def test_peer_closing_without_answer_raises() -> None:
    with mllp_server(Raw, "") as port:  # MLLPServer writes nothing and closes
        with pytest.raises(SendError, match="closed the connection before answering"):
            _deliver(port)


def test_delimiters_in_patient_name_round_trip() -> None:
    received: list[str] = []
    nasty = dataclasses.replace(REPORT, patient_name="O|Brien&Co^Ann~X=オブライエン^アン", patient_id="P|1&2")
    with mllp_server(Answer, received, ("AA", "", None)) as port:
        assert _deliver(port, nasty).status == 0
    msg = parse_message(received[0], validation_level=VALIDATION_LEVEL.STRICT)
    msg.validate()
    pid = msg.oru_r01_patient_result.oru_r01_patient.pid
    assert len(pid.pid_5) == 1  # one repetition: "~" did not split the name
    name = pid.pid_5
    assert unescape(name.xpn_1.to_er7()) == "O|Brien&Co"
    assert unescape(name.xpn_2.to_er7()) == "Ann~X"
    assert len(name.children) == 2  # the ideographic group is left out
    assert unescape(pid.pid_3.cx_1.to_er7()) == "P|1&2"
    assert pid.pid_8.to_er7() == "M"  # the fields after PID-5 are where they belong


def test_empty_demographics_still_valid() -> None:
    bare = dataclasses.replace(REPORT, accession_number="", patient_id="", issuer_of_patient_id="",
                               patient_name="", patient_birth_date="", patient_sex="")
    msg = parse_message(build_oru(bare, control_id="E1", sending_application="AINODE"),
                        validation_level=VALIDATION_LEVEL.STRICT)
    assert msg.validate() is True
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert order.orc.orc_2.to_er7() == REPORT.study_uid
    assert order.obr.obr_18.to_er7() == ""


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hl7tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_tls_delivery(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    received: list[str] = []
    with mllp_server(Answer, received, ("AA", "", None), context=_server_context(cert, key)) as port:
        client = ssl.create_default_context(cafile=str(cert))
        delivery = _deliver(port, ssl_context=client, server_hostname="localhost")
    assert delivery.status == 0
    assert len(received) == 1 and SR_SOP in received[0]


def test_tls_untrusted_certificate_raises(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    with mllp_server(Answer, [], ("AA", "", None), context=_server_context(cert, key)) as port:
        with pytest.raises(SendError, match=f"127.0.0.1:{port} \\(TLS\\): TLS handshake failed"):
            _deliver(port, ssl_context=ssl.create_default_context(), server_hostname="localhost")
