"""`rebind trace [PORT...]`: a flight recorder of failing bind/listen/connect calls, each with
the blockers the conflict model named at that instant (docs/trace.md)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rebind.kernel.trace import Tracer
    from rebind.model.trace import Snapshot, TraceEvent
    from rebind.trace_record import TraceRecorder

#: Events asking the same question within this many ms share one snapshot (a crash loop or a
#: burst of 10,000 failing binds is one question, asked once, not 10,000 owner scans).
SHARE_MS = 100


@click.command(
    epilog="""\b
Examples:
  rebind trace                          every failing bind/listen/connect on the host
  rebind trace 8080 8443                only these ports (connect: destination or own port)
  rebind trace --errno all --json       every errno, one rebind.trace/1 object per line
  rebind trace 8080 --record fails.jsonl
  rebind history fails.jsonl 8080       read it back (beside `rebind top --record` files)
  rebind trace --install                birth certificates: ls/why/top say who bound each socket
  rebind trace --uninstall              remove them (unpins /sys/fs/bpf/rebind/birth_*)

\b
Each line: time, process[pid] (unit or container), the call and its address, the failing
socket's options, the errno, and what rebind's model names as the blocker right after the
failure (observer-free: nothing is bound). Needs root (CAP_BPF + CAP_PERFMON) and kernel BTF.
Exit status: 0 after --count events, 2 usage error, 3 missing permission or kernel feature,
130 interrupted (^C). Details: docs/trace.md.
""",
)
@click.argument("ports", nargs=-1, metavar="[PORT]...")
@click.option(
    "--errno",
    "errno_text",
    metavar="LIST",
    help="Errnos to report, by name or number, comma-separated, or 'all' "
    "(default: EADDRINUSE,EADDRNOTAVAIL,EACCES).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event (schema rebind.trace/1).")
@click.option(
    "--record", metavar="FILE", help="Append every event to FILE as JSON lines (rebind history reads it)."
)
@click.option(
    "--record-max",
    default="32M",
    metavar="SIZE",
    show_default=True,
    help="Rotate the --record FILE to FILE.1 when it would grow past SIZE (64K-1T).",
)
@click.option("--netns", "netns_text", metavar="INODE", help="Only events in this network namespace (inode).")
@click.option("--count", "count_text", metavar="N", help="Stop after N events.")
@click.option(
    "--no-owners", is_flag=True, help="Skip the owner scan in the snapshot (cheaper; no process names)."
)
@click.option("--no-snapshot", is_flag=True, help="Record the failures only, without the blocker snapshot.")
@click.option(
    "--install",
    is_flag=True,
    help="Install birth certificates: post-bind, listen and connect BPF programs that stay loaded "
    "(pinned under /sys/fs/bpf/rebind) so that ls/why/top show who bound each socket, and when.",
)
@click.option("--uninstall", is_flag=True, help="Remove what --install left loaded.")
def trace(
    ports: tuple[str, ...],
    errno_text: str | None,
    as_json: bool,
    record: str | None,
    record_max: str,
    netns_text: str | None,
    count_text: str | None,
    no_owners: bool,
    no_snapshot: bool,
    install: bool,
    uninstall: bool,
) -> int:
    """Record every failing bind(), listen() and connect() on this host with the blocker seen
    at that instant (address, options, errno, process, namespace)."""
    from rebind.errors import UsageError

    if install or uninstall:
        if install and uninstall:
            raise UsageError("--install and --uninstall exclude each other")
        if ports or errno_text or as_json or record or netns_text or count_text or no_owners or no_snapshot:
            raise UsageError("--install and --uninstall take no other option")
        return _install() if install else _uninstall()
    from rebind.model.trace import parse_errnos
    from rebind.model.validate import parse_port
    from rebind.top.record import parse_size

    wanted_ports = frozenset(parse_port(p, what="PORT") for p in ports)
    errnos = parse_errnos(errno_text)
    netns = _positive(netns_text, "--netns")
    count = _positive(count_text, "--count")
    max_bytes = parse_size(record_max, what="--record-max")
    if record is not None and not record:
        raise UsageError("--record needs a file name")
    from rebind.kernel.trace import Tracer
    from rebind.trace_record import TraceRecorder

    recorder = TraceRecorder(record, max_bytes) if record else None
    try:
        tracer = Tracer(errnos)
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise
    loop = _Loop(tracer, wanted_ports, netns, count, as_json, recorder, not no_owners, not no_snapshot)
    why: str | None = None
    if not no_snapshot:
        from rebind.kernel.trace_snapshot import prepare

        # the bind-hash reader loaded and HZ calibrated now, not in the first event's snapshot
        # (without them, TCP snapshots take inet_diag's dumps: slower on a large table)
        why = prepare()
    try:
        _note(f"tracing failing bind/listen/connect ({_errno_words(errnos)}); ^C to stop")
        if not no_snapshot and why is not None:
            _note(f"note: TCP blocker snapshots from inet_diag's dumps ({why})")
        loop.run()
    finally:
        summary = loop.summary()
        tracer.close()
        if recorder is not None:
            recorder.close()
        _note(summary)
    return 0


def _install() -> int:
    from rebind.kernel import birth

    done = birth.install()
    if done.already:
        click.echo(f"birth certificates: already installed ({done.pin_dir})")
        return 0
    if done.replaced:
        click.echo(
            f"birth certificates: replaced an older install ({', '.join(done.replaced)}); "
            "the certificates it held are gone"
        )
    click.echo(
        f"birth certificates installed: programs rebind_birth4/rebind_birth6 (post-bind), "
        f"rebind_birthl (sock_ops: listen, accepted connections) and rebind_birthc4/rebind_birthc6 "
        f"(connect) on {done.cgroup}, map rebind_birth; pinned in "
        f"{done.pin_dir} (they stay loaded until `rebind trace --uninstall`, or a reboot)"
    )
    return 0


def _uninstall() -> int:
    from rebind.kernel import birth

    birth.check_privilege()
    removed = birth.uninstall()
    if removed:
        click.echo(f"birth certificates removed ({birth.pin_dir()}: {', '.join(removed)} unpinned)")
    else:
        click.echo(f"birth certificates: not installed ({birth.pin_dir()})")
    return 0


def _positive(text: str | None, what: str) -> int | None:
    from rebind.errors import UsageError

    if text is None:
        return None
    t = text.strip()
    if not (t.isascii() and t.isdigit()) or not 0 < int(t) < 2**63:
        raise UsageError(f"{what} {text!r} is not a positive integer")
    return int(t)


def _errno_words(errnos: frozenset[int]) -> str:
    import errno

    if len(errnos) > 64:
        return "every errno"
    return ", ".join(errno.errorcode.get(e, str(e)) for e in sorted(errnos))


def _note(line: str) -> None:
    try:
        sys.stderr.write(f"rebind: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class _Loop:
    def __init__(
        self,
        tracer: Tracer,
        ports: frozenset[int],
        netns: int | None,
        count: int | None,
        as_json: bool,
        recorder: TraceRecorder | None,
        owners: bool,
        snapshots: bool,
    ) -> None:
        self.tracer = tracer
        self.ports = ports
        self.netns = netns
        self.count = count
        self.as_json = as_json
        self.recorder = recorder
        self.owners = owners
        self.snapshots = snapshots
        self.shown = 0
        self.skipped = 0  # not TCP/UDP over IPv4/IPv6 (a unix socket's bind, ...)
        self.dropped_seen = 0
        self.recording = recorder is not None
        self._shared: dict[tuple[object, ...], tuple[int, Snapshot]] = {}
        self._context: dict[int, tuple[str | None, str | None]] = {}

    def run(self) -> None:
        from rebind.kernel.trace import decode

        for batch in self.tracer.events():
            offset = time.time_ns() - time.monotonic_ns()
            for raw in batch:
                ev = decode(raw, self.tracer.layout.bits)
                if ev is None:
                    self.skipped += 1
                    continue
                if not self._wanted(ev):
                    continue
                self._emit(replace(ev, ts=(ev.mono_ns + offset) / 1e9))
                if self.count is not None and self.shown >= self.count:
                    return
            self._check_drops()

    def _wanted(self, ev: TraceEvent) -> bool:
        from rebind.model.trace import wanted

        return wanted(ev, self.ports) and (self.netns is None or ev.netns == self.netns)

    def _emit(self, ev: TraceEvent) -> None:
        from rebind.render.trace import describe, to_json, to_line

        snap = self._snapshot(ev) if self.snapshots else None
        unit, container = self._context_of(ev)
        if self.as_json:
            doc = to_json(ev, snap, unit=unit, container=container)
            click.echo(json.dumps(doc, ensure_ascii=True, separators=(",", ":")))
        else:
            click.echo(describe(ev, snap, unit=container or unit))
        self.shown += 1
        if self.recorder is not None and self.recording:
            try:
                self.recorder.write_lines([to_line(ev, snap, unit=unit, container=container)])
            except Exception as exc:  # OSError, RecordStopped: say once, keep tracing
                self.recording = False
                _note(f"warning: recording stopped: {exc}")

    def _snapshot(self, ev: TraceEvent) -> Snapshot:
        from rebind.kernel.trace_snapshot import snapshot

        key = (ev.netns, ev.kind, ev.proto, ev.addr, ev.port, ev.reuseaddr, ev.reuseport, ev.v6only,
               ev.bound_dev_if, ev.uid, ev.local_addr, ev.local_port)  # fmt: skip
        hit = self._shared.get(key)
        if hit is not None and ev.mono_ns - hit[0] <= SHARE_MS * 1_000_000:
            return hit[1]
        snap = snapshot(ev, owners=self.owners)
        self._shared[key] = (ev.mono_ns, snap)
        if len(self._shared) > 1024:
            self._shared.clear()
        return snap

    def _context_of(self, ev: TraceEvent) -> tuple[str | None, str | None]:
        """(systemd unit, container label) of the event's cgroup, read once per cgroup."""
        known = self._context.get(ev.cgroup_id)
        if known is None:
            from rebind.kernel.containers import read_context

            ctx = read_context(ev.pid)
            known = (ctx.unit, ctx.container.label if ctx.container is not None else None)
            if ctx.unit is not None or ctx.container is not None or _alive(ev.pid):
                self._context[ev.cgroup_id] = known
        return known

    def _check_drops(self) -> None:
        dropped = self.tracer.counters().dropped
        if dropped > self.dropped_seen:
            _note(f"warning: {dropped - self.dropped_seen} event(s) dropped: the kernel ring was full")
            self.dropped_seen = dropped

    def summary(self) -> str:
        c = self.tracer.counters()
        return (
            f"{self.shown} event(s) shown; the kernel saw {c.matched} failing call(s) with a wanted "
            f"errno, {c.dropped} dropped (ring full), {self.skipped} not TCP/UDP"
        )


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
