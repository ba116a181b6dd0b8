"""Who holds these sockets, asked of the kernel: a BPF task iterator over every fd table.

The /proc scan (:mod:`rebind.kernel.owners`) reads one ``/proc/PID/fd/N`` link per open file of
every process in the sockets' network namespace. A BPF task iterator (Linux 5.8, commit
eaaacd23910f) runs a program over every task in the kernel instead, with no syscall per fd.

One program (:mod:`.programs`, assembled by :mod:`.asm` from offsets found in the kernel's BTF by
:mod:`.btf` and cached per boot by :mod:`.layoutcache`, loaded through raw ``bpf(2)`` by
:mod:`.syscall`, the one bpf() wrapper of every program here and of ``rebind trace``; :mod:`.scan`
runs it): a ``bpf_iter_task`` program with bpf_loop (Linux 5.17) copies each fd table's ``fd`` array 16
slots at a time and compares *file addresses*: a socket has exactly one ``struct file``
(sock_alloc_file(); dup, fork and SCM_RIGHTS share it), so once a wanted socket's file is known,
finding its holders needs no memory beyond the fd arrays. Addresses are learnt by reading each
file's inode until every wanted socket has been met, visiting likely holders (the sockets'
namespace and uids) first. Every task on the machine is visited, so a holder in another network
namespace (SCM_RIGHTS, setns) is found too, which the /proc scan does not look for.
Its records go to an mmapable array map sized to the request, not to the iterator's seq_file
(where one task's output is capped at 32 KiB, 1,023 records: the scan once ran in passes of
1,023 sockets, 98 of them for ``why --connect``'s 100k), so any number of sockets takes one scan.

Decided by measurement (``bench/owners.py``; tables, commands and machine load in
docs/benchmarks.md, "Owner lookup"): for the owners of one port, this program is at least 6x
faster than the /proc scan at both scales measured -- 9.4x on bench/mkload.py's 211k sockets
and 6.4x with 1.02M open sockets in the namespace, the holder visited last (quiet machine) --
and about 200x when the holder is visited first. Where there is nothing to gain it costs
milliseconds: an idle namespace took 10 ms (the /proc scan 10-17 ms), and one on a host with
1.2-1.4M open files elsewhere 15-57 ms (the /proc scan 8-48 ms), as it visits every task.

A second program, ``bpf_iter_task_file`` (Linux 5.8, one call per open file of every task on the
machine), was 2.5-8.5x faster than /proc only when the namespace held most of the host's files,
and 35-95x slower (0.34-0.76 s) for an idle namespace on a host with 0.6-1.2M open files; it
was removed. Kernels without bpf_loop (5.8-5.16) use the /proc scan.

The socket iterators (:mod:`.sockiter`, programs in :mod:`.sockprog`): ``bpf_iter__tcp`` and
``bpf_iter__udp`` (Linux 5.9; bpf_seq_write 5.8; bpf_get_socket_cookie from tracing programs
5.12) read each asked port's sockets as the kernel holds them -- SO_REUSEADDR/SO_REUSEPORT bits
(TIME_WAITs' too), ipv6only, bound device, sk_userlocks (bind() vs connect() port), sk_uid,
TIME_WAIT timestamps, the TCP bind bucket's fast-reuse cache, UDP chain order -- which inet_diag
does not show and which was otherwise inferred. Why, and what each field decides, is in
:mod:`.sockiter`'s docstring. Cost (bench/sockiter.py, docs/benchmarks.md): every socket of the
namespace is visited, ~2 ms in an idle namespace and ~130 ms CPU on bench/mkload.py's 211k
sockets, where the inet_diag dump of one port takes ~65 ms; counting per (port, state) in the
kernel took 0.41x the CPU of counting the dump's records. Unavailable (no capability, no BTF,
lockdown, REBIND_NO_BPF) -> callers fall back and mark the facts unknown.
"""

from __future__ import annotations

from rebind.kernel.bpf.scan import Hit, ScanResult, find_socket_holders
from rebind.kernel.bpf.syscall import BPFUnavailable, VerifierRejected

__all__ = ["BPFUnavailable", "Hit", "ScanResult", "VerifierRejected", "find_socket_holders"]
