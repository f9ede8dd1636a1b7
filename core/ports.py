"""Can a server listen on HOST:PORT? Asked before a slow start (a model load), so that a port
in use is one line at once rather than a traceback after the load."""

from __future__ import annotations

import errno
import socket

from core.errors import UserError


def check_listen(host: str, port: int, what: str = "the server") -> None:
    """UserError (one line naming --host/--port and the fix) unless `host:port` can be bound
    now. SO_REUSEADDR as servers set it: a port left in TIME_WAIT by a server that just stopped
    counts as free, one that something listens on does not."""
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: choose a port from 1 to 65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror}): use "
                        "127.0.0.1 (the default), or 0.0.0.0 to listen on every interface"
                        ) from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (another server, or {what} "
                                f"already running): stop it, or pass --port N (e.g. --port "
                                f"{port + 1 if port < 65535 else port - 1})") from None
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pass another "
                            "--host or --port") from None
