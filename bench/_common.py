"""Helpers shared by the bench scripts (run as scripts: bench/ is on sys.path)."""
import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers and process groups stay on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
