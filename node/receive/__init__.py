"""The DICOM SCP: who may associate, C-ECHO and C-STORE. The only SCP code.

The flow of one connection, module by module:

- :mod:`~node.receive.server`: listening sockets, one thread per connection,
  the bounds on connections per host, pending and associated.
- :mod:`~node.receive.pdu`: every PDU read with a deadline and a size cap,
  through one reusable buffer.
- :mod:`~node.receive.association`: the A-ASSOCIATE-RQ (pynetdicom's PDU
  classes and presentation-context negotiation), :mod:`~node.receive.policy`
  (called AE, callers, hosts), then the P-DATA loop: data set fragments go
  straight into a partial file in ``tmp/``.
- :mod:`~node.receive.dimse`: the command sets and the file meta, encoded
  and decoded directly.
- :mod:`~node.receive.instance` with :mod:`~node.receive.dataset`: the
  received data set walked for structure and its UIDs, committed durably
  (fsync'd, renamed, audited) before Success, the completion timer noted.
- :mod:`~node.receive.process`: all of it as one :class:`Receiving`, run by
  the node itself or, with ``[node] receivers`` > 1, by that many receiving
  processes sharing the port (SO_REUSEPORT).
"""

from node.receive.instance import Receiver
from node.receive.policy import Policy
from node.receive.server import Limits, Server

__all__ = ["Limits", "Policy", "Receiver", "Server"]
