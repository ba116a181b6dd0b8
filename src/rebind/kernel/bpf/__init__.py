"""Who holds these sockets, asked of the kernel: a BPF task iterator over every fd table.

The /proc scan (:mod:`rebind.kernel.owners`) reads one ``/proc/PID/fd/N`` link per open file of
every process in the sockets' network namespace. A BPF task iterator (Linux 5.8, commit
eaaacd23910f) runs a program over every task in the kernel instead, with no syscall per fd.

Two programs (:mod:`.programs`, assembled by :mod:`.asm` from offsets found in the kernel's BTF by
:mod:`.btf`, loaded through raw ``bpf(2)`` by :mod:`.syscall`; :mod:`.scan` runs them):

* **fd-table** (``bpf_iter_task`` + bpf_loop, Linux 5.17): copies each fd table's ``fd`` array
  16 slots at a time and compares *file addresses*: a socket has exactly one ``struct file``
  (sock_alloc_file(); dup, fork and SCM_RIGHTS share it), so once a wanted socket's file is
  known, finding its holders needs no memory beyond the fd arrays. Addresses are learnt by
  reading each file's inode until every wanted socket has been met (likely holders first).
* **task_file** (``bpf_iter_task_file``, Linux 5.8): called once per open file, reads every
  file's inode. Only for kernels without bpf_loop (5.8-5.16).

Kept because it was measured (`bench/owners.py`, docs/benchmarks.md "Owner lookup"): for the
owners of port 8080 under bench/mkload.py's load (211k TCP sockets, 201 holders),
``find_owners()`` took 0.027 s with the fd-table program, 0.107 s with the task_file program and
0.250 s with the /proc scan (9.4x and 2.3x faster than /proc); with 1.02M open sockets over 61
processes, 0.343 s, 0.457 s and 2.19 s (6.4x and 4.8x). Both clear the 2x bar. On an idle
namespace they are within a few milliseconds of each other, program loading included.
"""

from __future__ import annotations

from rebind.kernel.bpf.scan import Hit, ScanResult, find_socket_holders
from rebind.kernel.bpf.syscall import BPFUnavailable, VerifierRejected

__all__ = ["BPFUnavailable", "Hit", "ScanResult", "VerifierRejected", "find_socket_holders"]
