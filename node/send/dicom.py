"""C-STORE SCU: Part 10 files to a storage SCP in one association (over DICOM TLS when asked)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import Destination, TLSConfig
from node.send.delivery import Delivery, SendError

logger = logging.getLogger(__name__)

SUCCESS = 0x0000


def c_store(
    paths: Path | Sequence[Path], dest: Destination, calling_ae: str, timeout: float, tls: TLSConfig | None = None
) -> Delivery:
    """Send Part 10 files by C-STORE in one association; returns the peer's statuses or raises SendError.

    A destination with ``tls`` is reached over TLS with the ``tls`` settings.
    """
    from pynetdicom import AE

    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError('Argument "paths" must name at least one file.')
    datasets = [dcmread(p) for p in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"
    tls_args = None
    if dest.tls:
        from node.tls import tls_args as make_tls_args

        tls_args = make_tls_args(tls or TLSConfig(), dest.host)
    started = time.monotonic()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        reason = getattr(rsp, "reason_str", None) or f"result 0x{getattr(rsp, 'result', 0):02X}"
        raise SendError(f"{where}: association rejected: {reason}")
    if not assoc.is_established:
        if tls_args is not None and assoc.acceptor.primitive is None:
            from node.tls import handshake_problem

            if (problem := handshake_problem(dest.host, dest.port, tls_args, timeout)) is not None:
                raise SendError(f"{where}: no association: {problem}")
        raise SendError(f"{where}: no association (refused, aborted or timed out)")
    codes: list[int] = []
    try:
        for ds in datasets:
            codes.append(_store_one(assoc, ds, where))
    finally:
        if assoc.is_established:
            assoc.release()
    return Delivery(codes[-1], time.monotonic() - started, tuple(codes))


def _store_one(assoc: Any, ds: Any, where: str) -> int:
    """One C-STORE on an open association: the status, or SendError for a failure."""
    what = f"{where}: C-STORE of {ds.SOPInstanceUID}"
    if not any(c.abstract_syntax == ds.SOPClassUID for c in assoc.accepted_contexts):
        raise SendError(f"{what}: the peer accepts no presentation context for SOP class {ds.SOPClassUID}")
    status = assoc.send_c_store(ds)
    if not status or "Status" not in status:
        raise SendError(f"{what}: no response (connection lost or timed out)")
    code = int(status.Status)
    if code != SUCCESS and not 0xB000 <= code <= 0xBFFF:
        comment = status.get("ErrorComment", "")
        raise SendError(f"{what} failed with status 0x{code:04X} {comment}".rstrip())
    if code != SUCCESS:
        logger.warning("%s: stored with warning status 0x%04X", what, code)
    return code
