"""Loopback only, for the service processes the reliability tests start.

pytest-socket keeps the test process on 127.0.0.1/::1, but pods and
dispatchers run as child processes where it does not reach. The hostile-input
tests put this folder on their PYTHONPATH and set SDEKS_TEST_LOOPBACK_ONLY=1,
so a child can neither connect beyond loopback nor look a name up in DNS:
an SSRF test cannot reach out even when the guard under test is wrong (the
link then fails as unreachable instead of forbidden, and the test says so).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

if os.environ.get("SDEKS_TEST_LOOPBACK_ONLY") == "1":
    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex
    _getaddrinfo = socket.getaddrinfo

    def _refuse_unless_loopback(sock: socket.socket, address: object) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host = str(address[0]).split("%", 1)[0]  # type: ignore[index]
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_loopback:
            raise OSError(errno.ENETUNREACH, f"sandbox: {host} is beyond loopback")

    def connect(self: socket.socket, address: object) -> None:
        _refuse_unless_loopback(self, address)
        return _connect(self, address)  # type: ignore[arg-type]

    def connect_ex(self: socket.socket, address: object) -> int:
        _refuse_unless_loopback(self, address)
        return _connect_ex(self, address)  # type: ignore[arg-type]

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        name = host.decode() if isinstance(host, bytes) else host
        if name in (None, "localhost"):
            return _getaddrinfo(host, port, family, type, proto, flags)
        try:  # numeric forms only (inet_aton's too: 2130706433, 0x7f.1): no DNS traffic
            return _getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            raise socket.gaierror(
                socket.EAI_NONAME, f"sandbox: no DNS lookup of {name!r}"
            ) from None

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
