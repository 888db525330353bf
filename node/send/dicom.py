"""C-STORE SCU: Part 10 files to a storage SCP in one association (over DICOM TLS when asked).

Each file is sent in the transfer syntax it is stored in, its data set bytes
as they are (pynetdicom reads a file given by path without decoding it): a
forwarded JPEG CT arrives with the very pixel data the scanner sent. A file
in a native transfer syntax may also go in the other native one the peer
prefers; a compressed one is never transcoded, so a peer that accepts none
of its transfer syntax gets a clear failure instead.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.config import Destination, TLSConfig
from node.send.delivery import Delivery, SendError

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: An association proposes at most 128 presentation contexts (PS3.8: odd IDs 1-255).
MAX_CONTEXTS = 128


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
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"
    metas = [file_meta(p) for p in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    pairs = list(dict.fromkeys(metas))
    if len(pairs) > MAX_CONTEXTS:
        raise SendError(f"{where}: {len(pairs)} SOP class and transfer syntax pairs, more than one association "
                        f"can propose ({MAX_CONTEXTS})")
    for sop_class, syntax in pairs:  # one context per pair: the peer must not pick another syntax for a compressed file
        ae.add_requested_context(sop_class, [syntax, *(n for n in NATIVE if n != syntax)] if syntax in NATIVE
                                 else [syntax])
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
    if not assoc.is_established and assoc.acceptor.primitive is not None and assoc.rejected_contexts:
        raise SendError(f"{where}: the peer accepts none of the presentation contexts proposed: "
                        + _rejections(assoc.requestor.requested_contexts, assoc.rejected_contexts))
    if not assoc.is_established:
        if tls_args is not None and assoc.acceptor.primitive is None:
            from node.tls import handshake_problem

            if (problem := handshake_problem(dest.host, dest.port, tls_args, timeout)) is not None:
                raise SendError(f"{where}: no association: {problem}")
        raise SendError(f"{where}: no association (refused, aborted or timed out)")
    codes: list[int] = []
    try:
        for path, (sop_class, syntax) in zip(files, metas):
            codes.append(_store_one(assoc, path, sop_class, syntax, where))
    finally:
        if assoc.is_established:
            assoc.release()
    return Delivery(codes[-1], time.monotonic() - started, tuple(codes))


#: Presentation context results (PS3.8 Table 9-18) other than acceptance.
_REFUSALS = {1: "user rejection", 2: "no reason", 3: "abstract syntax not supported",
             4: "transfer syntaxes not supported"}


def _rejections(requested: Sequence[Any], rejected: Sequence[Any]) -> str:
    """Each refused context in words: its SOP class, the transfer syntaxes we offered, why."""
    offered = {c.context_id: c for c in requested}
    words = []
    for c in rejected:
        mine = offered.get(c.context_id, c)
        syntaxes = ", ".join(str(ts) for ts in mine.transfer_syntax)
        words.append(f"{mine.abstract_syntax} in {syntaxes} ({_REFUSALS.get(c.result, f'result {c.result}')})")
    return "; ".join(words)


def file_meta(path: Path) -> tuple[str, str]:
    """(SOP class, transfer syntax) from a Part 10 file's meta; SendError when it has none."""
    try:
        meta = read_file_meta_info(path)
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    except (OSError, AttributeError, ValueError) as exc:
        raise SendError(f"{path.name}: not a readable Part 10 file: {exc}") from None


def _store_one(assoc: Any, path: Path, sop_class: str, syntax: str, where: str) -> int:
    """One C-STORE on an open association: the status, or SendError for a failure."""
    what = f"{where}: C-STORE of {path.stem}"
    accepted = [c.transfer_syntax[0] for c in assoc.accepted_contexts if c.abstract_syntax == sop_class]
    if not accepted:
        raise SendError(f"{what}: the peer accepts no presentation context for SOP class {sop_class}")
    if syntax in accepted:
        status = assoc.send_c_store(path)  # the file's data set as it is, never decoded
    elif syntax in NATIVE:
        status = assoc.send_c_store(dcmread(path))  # encoded again in the native syntax the peer took
    else:
        raise SendError(f"{what}: the peer does not accept its transfer syntax {syntax} (not transcoded)")
    if not status or "Status" not in status:
        raise SendError(f"{what}: no response (connection lost or timed out)")
    code = int(status.Status)
    if code != SUCCESS and not 0xB000 <= code <= 0xBFFF:
        comment = status.get("ErrorComment", "")
        raise SendError(f"{what} failed with status 0x{code:04X} {comment}".rstrip())
    if code != SUCCESS:
        logger.warning("%s: stored with warning status 0x%04X", what, code)
    return code
