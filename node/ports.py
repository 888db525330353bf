"""Which TCP ports this machine listens on, read from the kernel (no connection opened).

For ``/readyz`` (is the SCP listening?) and for ``ainode serve`` with several
receiving processes, which must not join a port someone else already listens on
(SO_REUSEPORT would let it share the port silently with another node of the same user).
"""

from __future__ import annotations

#: The kernel's TCP socket tables and the state number of a listening socket in them.
PROC_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_LISTEN = "0A"


def listening_ports() -> set[int] | None:
    """The local TCP ports some socket listens on (this network namespace), or None without /proc."""
    ports: set[int] = set()
    found = False
    for table in PROC_TCP:
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if found else None
