"""One connection to the SCP, from its first byte to its close (PS3.8 9.2, PS3.7 9.3).

pynetdicom decodes and encodes the A-ASSOCIATE PDUs and negotiates the
presentation contexts and roles, as the field's reference does; everything
after that is this module's own loop, one thread per connection, that blocks
in ``recv_into`` (no polling): P-DATA values go from the connection's buffer
straight into the partial file of the instance they belong to, the command
set is decoded once, the response is three fixed-shape PDUs' worth of bytes.

Every way a connection can end is one of: released (A-RELEASE), aborted by
the peer, closed by the peer, rejected (A-ASSOCIATE-RJ, audited), or
dropped by the node (:class:`~node.receive.pdu.Dropped`: a deadline missed,
a length over its cap, a malformed or unexpected PDU), which sends an
A-ABORT where the standard asks for one, is logged once and audited.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Any

from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from node import metrics
from node.receive import dimse
from node.receive.instance import CANNOT_UNDERSTAND, CANNOT_UNDERSTAND_MISSING_UID, OUT_OF_RESOURCES, Peer, StoreRequest
from node.receive.pdu import (
    A_ABORT, A_ASSOCIATE_RQ, A_RELEASE_RQ, ABORT_INVALID_PARAMETER, ABORT_UNEXPECTED_PARAMETER, ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU, BUFFER_SIZE, MAX_ASSOCIATE_RQ, P_DATA_TF, PDU_NAMES, RELEASE_RP, Dropped, PeerClosed,
    Reader, abort_pdu, pdu_header,
)
from node.receive.policy import (
    REJECT_APPLICATION_CONTEXT, REJECT_CALLED_AE, REJECT_CALLING_AE, REJECT_LOCAL_LIMIT, REJECT_NO_REASON,
    REJECT_PROTOCOL_VERSION, Reason, ae_title_problem, escaped,
)
from node.store import Partial
from node.tls import handshake_failure, peer_subject

if TYPE_CHECKING:
    from node.receive.server import Server

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_REJECT_NAMES = {
    REJECT_CALLING_AE: "calling_ae", REJECT_CALLED_AE: "called_ae", REJECT_LOCAL_LIMIT: "local_limit",
    REJECT_PROTOCOL_VERSION: "protocol_version", REJECT_APPLICATION_CONTEXT: "application_context",
    REJECT_NO_REASON: "no_reason",
}
UNRECOGNIZED_OPERATION = 0x0211
_ITEM = struct.Struct(">LBB")


class _Message:
    """A C-STORE (or other request) whose data set is still arriving."""

    def __init__(self, command: dimse.Command, context_id: int) -> None:
        self.command = command
        self.context_id = context_id
        self.request: StoreRequest | None = None
        self.refusal: tuple[int, str] | None = None
        self.partial: Partial | None = None
        self.head = 0
        self.write_error: OSError | None = None

    def write(self, data: memoryview) -> None:
        if self.partial is None:
            return
        try:
            self.partial.write(data)
        except OSError as exc:  # disk full: keep reading the data set, answer 0xA700 at its end
            self.write_error = exc
            self.partial.discard()
            self.partial = None

    def discard(self) -> None:
        if self.partial is not None:
            self.partial.discard()
            self.partial = None


class Association:
    """One accepted TCP (or TLS) connection and, if it gets that far, its association."""

    def __init__(self, server: "Server", sock: socket.socket, address: tuple[Any, ...], tls: ssl.SSLContext | None):
        self.server = server
        self.sock = sock
        self.address = str(address[0])
        self.port = int(address[1])
        self.tls = tls
        self.opened = time.monotonic()
        self.reader = Reader(sock)
        self.peer = Peer("", self.address, self.port)
        self.established = False
        self.tls_subject: str | None = None
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0
        self.max_pdu = 0  # what the A-ASSOCIATE-AC announced (0: no limit)
        self.command = bytearray()
        self.message: _Message | None = None
        self.stopping = False
        self.spare: Partial | None = None  # the next instance's partial file, opened while the peer turns around

    # --- the connection's life ----------------------------------------------------------

    def run(self) -> None:
        try:
            if self.tls is not None and not self._handshake():
                return
            if self._negotiate():
                self._serve()
        except Dropped as drop:
            self._drop(drop)
        except PeerClosed as closed:
            if self.stopping:
                logger.warning("Association from %s: aborted, the node is stopping", self.peer)
            elif self.established:
                incomplete = " with an instance incomplete" if self.message is not None else ""
                logger.warning("Association from %s: the peer closed the connection%s (%s)", self.peer,
                               incomplete, closed)
            else:
                logger.info("Connection from %s:%d closed before an association (%s)", self.address, self.port,
                            closed)
        except Exception:
            logger.exception("Connection from %s:%d: unexpected error; aborting it", self.address, self.port)
            self._send_quietly(abort_pdu())
        finally:
            if self.message is not None:
                self.message.discard()
            if self.spare is not None:
                self.spare.discard()
            self._close()
            self.server.closed(self)

    def abort(self) -> None:
        """From another thread (the node stopping): A-ABORT the peer and wake this connection's thread."""
        self.stopping = True
        self._send_quietly(abort_pdu(source=0x00))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handshake(self) -> bool:
        """The TLS handshake, bounded; a failure closes the connection and is audited."""
        assert self.tls is not None
        timeout = self.server.handshake_timeout
        try:
            self.sock = self.tls.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.sock.settimeout(timeout)
            self.sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            reason = handshake_failure(exc, timeout)
            logger.warning("Connection from %s:%d to the TLS port refused: %s", self.address, self.port, reason)
            self.server.audit_tls_refused(self.address, self.port, reason)
            return False
        self.reader.sock = self.sock
        self.tls_subject = peer_subject(self.sock) or ""
        return True

    def _drop(self, drop: Dropped) -> None:
        who = str(self.peer) if self.established else f"{self.address}:{self.port}"
        logger.warning("Connection from %s dropped: %s", who, drop.why)
        metrics.DROPPED.labels(drop.kind).inc()
        if drop.abort is not None:
            self._send_quietly(abort_pdu(drop.abort))
        self.server.audit_dropped(self.peer, drop.why)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass

    def _close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _send(self, data: bytes) -> None:
        self.sock.settimeout(self.server.limits.idle_timeout)
        try:
            self.sock.sendall(data)
        except (socket.timeout, TimeoutError):
            raise Dropped(f"did not read our PDUs for {self.server.limits.idle_timeout:g} s", abort=None,
                          kind="timeout") from None
        except OSError as exc:
            raise PeerClosed(exc.strerror or type(exc).__name__) from None

    def _header(self, deadline: float, waiting_for: str, timeout: float) -> tuple[int, int]:
        try:
            return self.reader.header(deadline)
        except TimeoutError:
            raise Dropped(f"no {waiting_for} within {timeout:g} s", abort=None if not self.established else 0,
                          kind="timeout") from None

    def _body(self, n: int, deadline: float, what: str, timeout: float) -> memoryview:
        try:
            return self.reader.exact(n, deadline)
        except TimeoutError:
            raise Dropped(f"{what} not complete within {timeout:g} s", abort=None if not self.established else 0,
                          kind="timeout") from None

    # --- association negotiation -------------------------------------------------------

    def _reject(self, reason: Reason, why: str, calling: str, called: str) -> None:
        logger.warning("Association from %s@%s to %s: rejected, %s", escaped(calling) or "?", self.address,
                       escaped(called), why)
        result, source, diagnostic = reason
        metrics.ASSOCIATIONS.labels("rejected", _REJECT_NAMES.get(reason, "other")).inc()
        self._send_quietly(bytes((0x03, 0, 0, 0, 0, 4, 0, result, source, diagnostic)))
        self.server.audit_association(calling, self.address, self.port, called, why, self.tls_subject)

    def _negotiate(self) -> bool:
        """Read the A-ASSOCIATE-RQ (bounded), then reject it or accept it; True once accepted."""
        limits = self.server.limits
        deadline = self.opened + limits.associate_timeout
        pdu_type, length = self._header(deadline, "A-ASSOCIATE-RQ", limits.associate_timeout)
        if pdu_type == A_ABORT:
            logger.info("Connection from %s:%d aborted by the peer before associating", self.address, self.port)
            return False
        if pdu_type != A_ASSOCIATE_RQ:
            name = PDU_NAMES.get(pdu_type)
            raise Dropped(f"sent {name or f'an unknown PDU type 0x{pdu_type:02X}'} before an A-ASSOCIATE-RQ",
                          abort=ABORT_UNEXPECTED_PDU if name else ABORT_UNRECOGNIZED_PDU)
        if length > MAX_ASSOCIATE_RQ:
            raise Dropped(f"declared an A-ASSOCIATE-RQ of {length} bytes, more than {MAX_ASSOCIATE_RQ}",
                          abort=ABORT_INVALID_PARAMETER, kind="oversized")
        if length < 68:
            raise Dropped(f"sent an A-ASSOCIATE-RQ of {length} bytes, too short to be one",
                          abort=ABORT_INVALID_PARAMETER)
        body = bytes(self._body(length, deadline, "A-ASSOCIATE-RQ", limits.associate_timeout))
        called_raw, calling_raw = body[4:20], body[20:36]
        calling, called = escaped(calling_raw.strip(b" \0")), escaped(called_raw.strip(b" \0"))
        self.peer = Peer(calling, self.address, self.port)
        if problem := ae_title_problem(calling_raw):
            self._reject(REJECT_CALLING_AE, f"calling AE title {calling!r} {problem}", calling, called)
            return False
        if problem := ae_title_problem(called_raw):
            self._reject(REJECT_CALLED_AE, f"called AE title {called!r} {problem}", calling, called)
            return False
        try:
            pdu = AssociateRQ()
            pdu.decode(pdu_header(A_ASSOCIATE_RQ, length) + body)
            rq = pdu.to_primitive()
            contexts = rq.presentation_context_definition_list
            user_items = list(rq.user_information)
        except Exception as exc:  # pynetdicom raises many kinds on bad bytes
            raise Dropped(f"sent a malformed A-ASSOCIATE-RQ ({type(exc).__name__})",
                          abort=ABORT_INVALID_PARAMETER) from None
        if not int.from_bytes(body[0:2], "big") & 1:
            self._reject(REJECT_PROTOCOL_VERSION, "protocol version not supported", calling, called)
            return False
        if str(rq.application_context_name) != APPLICATION_CONTEXT:
            self._reject(REJECT_APPLICATION_CONTEXT,
                         f"application context {escaped(str(rq.application_context_name))!r} not supported",
                         calling, called)
            return False
        for cx in contexts:
            if not cx.abstract_syntax or not cx.transfer_syntax or not (cx.context_id or 0) % 2:
                raise Dropped(f"sent a malformed presentation context (ID {cx.context_id}): no abstract syntax, "
                              "no transfer syntax or an even ID", abort=ABORT_INVALID_PARAMETER)
        if not contexts:
            self._reject(REJECT_NO_REASON, "no presentation context proposed", calling, called)
            return False
        refusal = self.server.receiver.policy.check(calling, called, self.address)
        if refusal is not None:
            self._reject(refusal[0], refusal[1], calling, called)
            return False
        if not self.server.try_establish(self):
            self._reject(REJECT_LOCAL_LIMIT, f"local limit exceeded ({limits.max_associations} associations open)",
                         calling, called)
            return False
        self.established = True
        self.peer = Peer(calling, self.address, self.port, called)  # called: a pipeline's AE title, policy said
        self._accept(rq, contexts, user_items)
        return True

    def _accept(self, rq: A_ASSOCIATE, contexts: list[PresentationContext], user_items: list[Any]) -> None:
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
                 for item in user_items if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, role_items = negotiate_as_acceptor(contexts, self.server.contexts, roles or None)
        self.contexts = {int(cx.context_id): cx for cx in results if cx.result == 0x00}  # type: ignore[arg-type]
        self.peer_max_pdu = next((int(i.maximum_length_received or 0) for i in user_items
                                  if isinstance(i, MaximumLengthNotification)), 0)
        self.max_pdu = self.server.limits.max_pdu
        max_pdu = MaximumLengthNotification()
        max_pdu.maximum_length_received = self.max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = dimse.IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = dimse.IMPLEMENTATION_VERSION_NAME
        items: list[Any] = [max_pdu, implementation, version, *role_items]
        if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in user_items):
            window = AsynchronousOperationsWindowNegotiation()  # one operation at a time, each way
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            items.append(window)
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        ac.user_information = items
        pdu = AssociateAC()
        pdu.from_primitive(ac)
        self._send(pdu.encode())
        self.reader.grow(BUFFER_SIZE)
        metrics.ASSOCIATIONS.labels("accepted", "").inc()
        tls = "" if self.tls_subject is None else f" (TLS, client {self.tls_subject or 'without certificate'})"
        logger.info("Association from %s to %s: accepted%s", self.peer, escaped(str(rq.called_ae_title).strip()),
                    tls)
        self.server.audit_association(self.peer.ae_title, self.address, self.port,
                                      str(rq.called_ae_title).strip(), None, self.tls_subject)

    # --- the established association ----------------------------------------------------

    def _serve(self) -> None:
        limits = self.server.limits
        while True:
            idle = limits.idle_timeout
            pdu_type, length = self._header(time.monotonic() + idle, "PDU", idle)
            deadline = time.monotonic() + idle  # the body, too, must arrive within the timeout
            if pdu_type == P_DATA_TF:
                if self.max_pdu and length > self.max_pdu:
                    raise Dropped(f"sent a P-DATA-TF of {length} bytes, more than the negotiated {self.max_pdu}",
                                  abort=ABORT_INVALID_PARAMETER, kind="oversized")
                self._p_data(length, deadline, idle)
            elif pdu_type == A_RELEASE_RQ:
                if length != 4:
                    raise Dropped(f"sent an A-RELEASE-RQ of {length} bytes", abort=ABORT_INVALID_PARAMETER)
                self._body(4, deadline, "A-RELEASE-RQ", idle)
                if self.message is not None:
                    logger.warning("Association from %s: released with an instance incomplete", self.peer)
                self._send(RELEASE_RP)
                logger.debug("Association from %s: released", self.peer)
                return
            elif pdu_type == A_ABORT:
                logger.warning("Association from %s: aborted by the peer%s", self.peer,
                               " with an instance incomplete" if self.message is not None else "")
                return
            elif pdu_type in PDU_NAMES:
                raise Dropped(f"sent an {PDU_NAMES[pdu_type]} inside an association", abort=ABORT_UNEXPECTED_PDU)
            else:
                raise Dropped(f"sent an unknown PDU type 0x{pdu_type:02X}", abort=ABORT_UNRECOGNIZED_PDU)

    def _p_data(self, length: int, deadline: float, timeout: float) -> None:
        remaining = length
        while remaining:
            if remaining < 6:
                raise Dropped("sent a P-DATA-TF whose last item is cut", abort=ABORT_INVALID_PARAMETER)
            item_length, context_id, header = _ITEM.unpack(self._body(6, deadline, "P-DATA-TF", timeout))
            if item_length < 2 or item_length + 4 > remaining:
                raise Dropped(f"sent a PDV item of {item_length} bytes in {remaining} left of its P-DATA-TF",
                              abort=ABORT_INVALID_PARAMETER)
            remaining -= 4 + item_length
            size = item_length - 2
            if context_id not in self.contexts:
                raise Dropped(f"sent a PDV on presentation context {context_id}, which was not accepted",
                              abort=ABORT_UNEXPECTED_PARAMETER)
            try:
                if header & 0x01:
                    self._command_fragment(context_id, size, bool(header & 0x02), deadline)
                else:
                    self._data_fragment(context_id, size, bool(header & 0x02), deadline)
            except TimeoutError:
                raise Dropped(f"P-DATA-TF not complete within {timeout:g} s", abort=0, kind="timeout") from None

    def _command_fragment(self, context_id: int, size: int, last: bool, deadline: float) -> None:
        if self.message is not None:
            raise Dropped("sent a command fragment in the middle of a data set", abort=ABORT_UNEXPECTED_PARAMETER)
        if len(self.command) + size > dimse.MAX_COMMAND:
            raise Dropped(f"sent a command set of more than {dimse.MAX_COMMAND} bytes", abort=ABORT_INVALID_PARAMETER,
                          kind="oversized")
        self.reader.stream(size, deadline, self.command.extend)
        if not last:
            return
        data = bytes(self.command)
        self.command.clear()
        try:
            command = dimse.decode_command(data)
            field = command.field
        except dimse.CommandError as exc:
            raise Dropped(f"sent a malformed command set ({exc})", abort=ABORT_INVALID_PARAMETER) from None
        if field == dimse.C_CANCEL_RQ:
            return
        message = _Message(command, context_id)
        if field == dimse.C_STORE_RQ:
            self._begin_store(message)
        if command.has_data_set:
            self.message = message
        else:
            self._answer(message)

    def _begin_store(self, message: _Message) -> None:
        command, cx = message.command, self.contexts[message.context_id]
        sop_class = command.uid(dimse.AFFECTED_SOP_CLASS)
        sop_instance = command.uid(dimse.AFFECTED_SOP_INSTANCE)
        receiver = self.server.receiver
        if not sop_class or not sop_instance:
            message.refusal = receiver.failure(CANNOT_UNDERSTAND_MISSING_UID,
                                               "the C-STORE-RQ has no Affected SOP Class or Instance UID", self.peer)
            return
        if not command.has_data_set:
            message.refusal = receiver.failure(CANNOT_UNDERSTAND, "the C-STORE-RQ has no data set", self.peer,
                                               (None, sop_instance, sop_class))
            return
        transfer_syntax = str(cx.transfer_syntax[0])
        message.request = StoreRequest(sop_class, sop_instance, transfer_syntax, str(cx.abstract_syntax))
        message.refusal = receiver.refuse_early(self.peer, message.request)
        if message.refusal is not None:
            return
        try:
            message.partial, self.spare = self.spare or receiver.storage.open_partial(), None
            head = dimse.file_meta(sop_class, sop_instance, transfer_syntax, self.peer.ae_title)
            message.partial.write(head)
            message.head = len(head)
        except OSError as exc:
            message.discard()
            message.refusal = receiver.failure(OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}", self.peer,
                                               (None, sop_instance, sop_class))

    def _data_fragment(self, context_id: int, size: int, last: bool, deadline: float) -> None:
        message = self.message
        if message is None:
            raise Dropped("sent a data set fragment without a command", abort=ABORT_UNEXPECTED_PARAMETER)
        if context_id != message.context_id:
            raise Dropped("sent a data set fragment on another presentation context than its command",
                          abort=ABORT_UNEXPECTED_PARAMETER)
        self.reader.stream(size, deadline, message.write)
        if last:
            self.message = None
            self._answer(message)

    def _answer(self, message: _Message) -> None:
        command = message.command
        field = command.field
        if field == dimse.C_ECHO_RQ:
            logger.debug("C-ECHO from %s", self.peer)
            status, comment = 0x0000, None
        elif field == dimse.C_STORE_RQ:
            if message.refusal is not None:
                status, comment = message.refusal
            elif message.write_error is not None:
                exc = message.write_error
                status, comment = self.server.receiver.failure(
                    OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}", self.peer,
                    (None, message.request.sop_instance if message.request else None, None))
            else:
                assert message.request is not None and message.partial is not None
                size = message.partial.size - message.head
                status, comment = self.server.receiver.store(self.peer, message.request, message.partial,
                                                             message.head)
                if status == 0x0000:
                    metrics.RECEIVED_BYTES.inc(size)
            metrics.INSTANCES.labels(f"0x{status:04X}").inc()
            message.discard()
        else:
            logger.warning("Association from %s: command 0x%04X not supported here", self.peer, field)
            status, comment = UNRECOGNIZED_OPERATION, None
        self._send(self._command_pdus(message.context_id, dimse.response(command, status, comment)))
        if field == dimse.C_STORE_RQ and self.spare is None:
            try:  # off the next instance's critical path: the peer is reading our response meanwhile
                self.spare = self.server.receiver.storage.open_partial()
            except OSError:
                pass  # the next C-STORE tries again and answers 0xA700 if it cannot

    def _command_pdus(self, context_id: int, data: bytes) -> bytes:
        """P-DATA-TF PDUs carrying one command set, fragmented to the peer's maximum PDU length."""
        room = self.peer_max_pdu - 6 if self.peer_max_pdu > 6 else len(data)
        out = bytearray()
        for start in range(0, len(data), room):
            fragment = data[start:start + room]
            last = 0x02 if start + room >= len(data) else 0x00
            out += pdu_header(P_DATA_TF, len(fragment) + 6) + _ITEM.pack(len(fragment) + 2, context_id, 0x01 | last)
            out += fragment
        return bytes(out)
