"""Hostile receivers for webhook tests: real local servers that accept, then trickle.

A :class:`Trickler` reads the request and answers one byte of a status line a second, never
finishing its headers, so httpx's per-read timeout never fires: only a total deadline ends
the attempt. It stops trickling (and closes) after ``max_bytes`` or when closed.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ANSWER = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"." * 200


class Trickler:
    def __init__(self, *, every_s: float = 1.0, max_bytes: int = len(ANSWER)) -> None:
        self._every_s = every_s
        self._max_bytes = max_bytes
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)  # accept() wakes to see a close: closing alone won't
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0  # connections that sent a request
        self.open = 0  # connections being trickled to now
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/hook"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for thread in list(self._threads):
            thread.join(10)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)  # accepted sockets inherit the listener's timeout
            thread = threading.Thread(target=self._trickle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                if not conn.recv(65536):
                    return
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.open += 1
            try:
                for byte in ANSWER[: self._max_bytes]:
                    conn.sendall(bytes([byte]))
                    if self._stop.wait(self._every_s):
                        return
            except OSError:
                return  # the sender gave up and closed: what a deadline does
            finally:
                with self._lock:
                    self.open -= 1


@contextmanager
def tricklers(count: int, *, every_s: float = 1.0) -> Iterator[list[Trickler]]:
    made = [Trickler(every_s=every_s) for _ in range(count)]
    try:
        yield made
    finally:
        for trickler in made:
            trickler.close()
