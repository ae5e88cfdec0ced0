"""What a server process needs from its host, whatever runtime it runs: its HTTP port free before anything starts,
and SIGINT / SIGTERM turned into a clean shutdown.

Example::

    check_port_free("127.0.0.1", 8000)     # StartupError naming the address when it is taken
    stop = install_stop_signals()          # set by Ctrl-C or SIGTERM
"""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any


class StartupError(RuntimeError):
    """The application could not be deployed (the message is the cause, in one line)."""


def install_stop_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event set by SIGINT or SIGTERM (``stop``, or a new one), so a signal during startup still ends in a clean
    shutdown."""
    stop = stop or threading.Event()

    def _on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    return stop


def _tcp_socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)


def check_port_free(host: str, port: int) -> None:
    """Fail before loading anything when the HTTP port is taken (Ray's own error would be a remote traceback)."""
    with _tcp_socket(host) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def free_port(host: str) -> int:
    with _tcp_socket(host) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
