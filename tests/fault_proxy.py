"""A TCP proxy on 127.0.0.1:0 that injects network faults between a gRPC client and its server.

gRPC over a plaintext channel is HTTP/2 over one TCP connection, so a byte-level proxy passes it
through untouched; faults are applied to the bytes:

* ``latency_s``: every chunk waits this long before it is forwarded (a slow, far link);
* ``cut_upstream_after`` / ``cut_downstream_after``: once the bytes sent in that direction (over
  all connections) pass the threshold, the connection carrying them is reset (RST) right there,
  mid-message — once per threshold, so the client's retry goes through;
* ``stall_upstream_when``: a predicate checked before each upstream chunk; once it is true the
  connection forwards nothing more upstream (a link that hangs) until the client goes away,
  whereupon the proxy resets its side to the server too.

Counters (``connections``, ``cuts``, ``bytes_up``, ``bytes_down``) and the ``stalled`` event let a
test check that the fault it asked for really happened.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Callable

__all__ = ["FaultProxy"]

_CHUNK = 16 * 1024


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0), as a dropped link or a killed peer looks to the other side.

    ``shutdown`` first: a plain ``close`` does not wake the other pump thread blocked in
    ``recv`` on the same socket, and the kernel keeps the connection open until that call returns.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target`` ("HOST:PORT"), with the faults configured."""

    def __init__(
        self,
        target: str,
        *,
        latency_s: float = 0.0,
        cut_upstream_after: int | None = None,
        cut_downstream_after: int | None = None,
        stall_upstream_when: Callable[[], bool] | None = None,
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.latency_s = latency_s
        self._cut_after = {"up": cut_upstream_after, "down": cut_downstream_after}
        self.stall_upstream_when = stall_upstream_when
        self.connections = 0
        self.cuts = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _reset(sock)
        self._acceptor.join(timeout=5)

    # -- plumbing ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
                self._sockets.update((client, server))
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, "up", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down", pair), daemon=True).start()

    def _cut_point(self, direction: str, size: int) -> int | None:
        """Bytes of this chunk to forward before cutting, or None when no cut is due."""
        with self._lock:
            sent = self.bytes_up if direction == "up" else self.bytes_down
            threshold = self._cut_after[direction]
            if threshold is not None and sent + size > threshold:
                self._cut_after[direction] = None  # once
                self.cuts += 1
                return max(0, threshold - sent)
            if direction == "up":
                self.bytes_up += size
            else:
                self.bytes_down += size
            return None

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, pair: tuple[socket.socket, ...]) -> None:
        stalled = False
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if direction == "up" and not stalled and self.stall_upstream_when and self.stall_upstream_when():
                    stalled = True
                    self.stalled.set()
                if stalled:
                    continue  # swallowed: the link hangs; reading on only notices the client going away
                if self.latency_s:
                    time.sleep(self.latency_s)
                cut = self._cut_point(direction, len(data))
                if cut is not None:
                    dst.sendall(data[:cut])
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in pair:
                _reset(sock)
            with self._lock:
                self._sockets.difference_update(pair)
