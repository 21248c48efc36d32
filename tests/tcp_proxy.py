"""A TCP proxy on 127.0.0.1 whose link can be cut and restored, to stage network outages.

``cut()`` resets every open connection and closes the listening socket, so new connections are
refused (what a client sees when a load balancer or the server's host goes away);
``restore()`` listens again on the same port. Run as a script it proxies until killed, and
SIGUSR1 / SIGUSR2 cut and restore, and ``--cut-when`` cuts when a client sends given bytes (for a
proxy in front of a process under test):

    python tests/tcp_proxy.py --target 127.0.0.1:PORT --port-file FILE \
        [--cut-when /checkpoint_epoch_0001/ --cut-seconds 15]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import threading
import time


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``target``; ``cut()``/``restore()`` the link.

    Args:
        target (tuple[str, int]): where connections go.
        port (int): port to listen on (0: any free port).
    """

    def __init__(self, target: tuple[str, int], port: int = 0):
        self.target = target
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = None
        self.port = port
        self.cuts: list[tuple[float, float | None]] = []  # (cut at, restored at), time.time()
        self._triggers: list[tuple[bytes, float]] = []
        self.triggered = threading.Event()
        self._listen()

    def _listen(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.port = ls.getsockname()[1]
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # listener closed by cut()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if upstream and self._fire(data):
                    break  # the request that matched is lost with the link
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut_when(self, pattern: bytes, seconds: float) -> None:
        """Cut the link when a client sends bytes containing ``pattern`` (e.g. the request line of
        an upload), before they reach the server, and restore it ``seconds`` later. Each call arms
        one cut, which fires once."""
        with self._lock:
            self._triggers.append((pattern, seconds))

    def _fire(self, data: bytes) -> bool:
        if not self._triggers:
            return False
        with self._lock:
            trig = next((t for t in self._triggers if t[0] in data), None)
            if trig is None:
                return False
            self._triggers.remove(trig)
        print(f"tcp_proxy: cut on {trig[0]!r} for {trig[1]:.0f} s", flush=True)
        self.cut()
        threading.Timer(trig[1], self._restore_and_flag).start()
        return True

    def _restore_and_flag(self) -> None:
        self.restore()
        self.triggered.set()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.cuts.append((time.time(), None))
        self._listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            _reset(s)

    def restore(self) -> None:
        """Listen again on the same port."""
        self._listen()
        self.cuts[-1] = (self.cuts[-1][0], time.time())
        print(f"tcp_proxy: link cut {self.cuts[-1][1] - self.cuts[-1][0]:.1f} s, restored", flush=True)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            _reset(s)


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0), as a dropped link looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("--port-file", required=True, help="the listening port is written here")
    ap.add_argument("--cut-when", action="append", default=[],
                    help="cut when a client sends these bytes (e.g. /checkpoint_epoch_0001/); repeatable")
    ap.add_argument("--cut-seconds", type=float, default=15.0, help="how long a --cut-when cut lasts")
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    proxy = TcpProxy((host, int(port)))
    for pattern in a.cut_when:
        proxy.cut_when(pattern.encode(), a.cut_seconds)
    signal.signal(signal.SIGUSR1, lambda *_: (proxy.cut(), print(f"cut {time.time():.1f}", flush=True)))
    signal.signal(signal.SIGUSR2, lambda *_: (proxy.restore(), print(f"restored {time.time():.1f}", flush=True)))
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(proxy.port))
    os.replace(tmp, a.port_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
