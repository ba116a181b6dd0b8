"""Serving the metrics: HTTP with prometheus-client, or an atomically written textfile."""

from __future__ import annotations

import errno
import os
import secrets
from ipaddress import IPv6Address, ip_address
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from rebind.errors import EnvironmentProblem, UsageError
from rebind.model.validate import parse_port

DEFAULT_PORT = 9811


def parse_listen(text: str, *, what: str = "--listen") -> tuple[str, int]:
    """ADDR:PORT, [V6ADDR]:PORT, :PORT (every IPv4 address) or PORT; the address must be literal
    (a name could resolve differently at each start)."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{what} {text!r}: write an IPv6 address in brackets, e.g. [::1]:{DEFAULT_PORT}")
    host = host or "0.0.0.0"
    try:
        addr = ip_address(host)
    except ValueError:
        raise UsageError(f"{what} {text!r}: {host!r} is not an IP address (ADDR:PORT)") from None
    return str(addr), parse_port(port_text, what=f"{what} port")


def registry_with(collector: Collector, *, process: bool = True) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    if process:
        # process_cpu_seconds_total / process_resident_memory_bytes of the exporter itself.
        ProcessCollector(registry=reg)
    return reg


def start_http(registry: CollectorRegistry, addr: str, port: int) -> Any:
    """Start serving /metrics in a daemon thread; returns the server (call .shutdown())."""
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        shown = f"[{addr}]" if isinstance(ip_address(addr), IPv6Address) else addr
        hint = f" (see: rebind why {port})" if exc.errno == errno.EADDRINUSE else ""
        raise EnvironmentProblem(f"cannot listen on {shown}:{port}: {exc.strerror}{hint}") from exc
    return server


def render(registry: CollectorRegistry) -> bytes:
    out: bytes = generate_latest(registry)
    return out


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never half.

    The temporary file is created next to the target (rename() is atomic only within one file
    system) with O_EXCL|O_NOFOLLOW, so a file or symlink planted under its name in a shared
    directory is never followed or overwritten; its name does not end in .prom, so node_exporter's
    textfile collector never reads it. fsync before rename: after a crash the file is old or new.
    """
    directory, name = os.path.split(os.path.abspath(path))
    if not name.endswith(".prom"):
        raise UsageError(f"--textfile {path!r}: the name must end in .prom (node_exporter reads only *.prom)")
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentProblem(f"--textfile directory {directory!r}: {exc.strerror}") from exc
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)  # the rename itself survives a crash
    except BaseException as exc:  # Ctrl-C and SIGTERM included: never leave the temp file behind
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise EnvironmentProblem(f"cannot write --textfile {path!r}: {exc.strerror}") from exc
        raise
    finally:
        os.close(dfd)
