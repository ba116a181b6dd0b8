"""(A copy of the shared load generator, kept here so benchmarks run from the repo.)

Fill the current network namespace with a large socket table, then wait.

Run it inside a throwaway namespace, e.g.  unshare -n sh -c 'ip link set lo up; python3 mkload.py ...'

  python3 mkload.py --established 100000 --timewait 20000 --procs 200 --ready /tmp/ready
  python3 mkload.py ... --uids 50 --keep 4

What it builds:
  * a listener on 0.0.0.0:8080 (the target) and a decoy listener on 127.0.0.1:8081;
  * server-side TIME_WAIT sockets on 127.0.0.1:9000 (the server closes first);
  * --reuseport N (default 0): a SO_REUSEPORT group of N listeners on 0.0.0.0:8443;
  * --procs child processes, each holding established loopback connection pairs
    (--established pairs in total, spread over 127.0.0.2..201 and ports 10000+);
  * by default every child inherits the 8080 listener through fork, as a server
    that forks workers would. With --uids N, all but the first --keep children
    close that inherited fd and switch to uid 20000 + (i % N), so most of the
    process table belongs to other users.
When all is built it creates the --ready file and sleeps until killed.
The open-files hard limit here is about 20000 per process, so keep
--established / --procs under ~9000.
"""

import argparse
import os
import resource
import socket
import time

ap = argparse.ArgumentParser()
ap.add_argument("--established", type=int, default=100000)
ap.add_argument("--timewait", type=int, default=20000)
ap.add_argument("--procs", type=int, default=200)
ap.add_argument("--uids", type=int, default=0)
ap.add_argument("--keep", type=int, default=4)
ap.add_argument("--reuseport", type=int, default=0)
ap.add_argument("--ready", required=True)
args = ap.parse_args()

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

target = socket.create_server(("0.0.0.0", 8080), backlog=4096)
decoy = socket.create_server(("127.0.0.1", 8081), backlog=4096)
group = [
    socket.create_server(("0.0.0.0", 8443), backlog=4096, reuse_port=True) for _ in range(args.reuseport)
]

srv = socket.create_server(("127.0.0.1", 9000), backlog=4096)
for _ in range(args.timewait):
    c = socket.create_connection(("127.0.0.1", 9000))
    s, _ = srv.accept()
    s.close()
    c.close()
srv.close()


def hold_pairs(n, port, src):
    listener = socket.create_server((src, port), backlog=4096)
    held = []
    for _ in range(n):
        c = socket.create_connection((src, port))
        s, _ = listener.accept()
        held += [c, s]
    return listener, held


per = args.established // max(args.procs, 1)
for i in range(args.procs):
    if os.fork() == 0:
        if args.uids and i >= args.keep:
            target.close()
            os.setgid(20000 + i % args.uids)
            os.setuid(20000 + i % args.uids)
        kept = hold_pairs(per, 10000 + i, f"127.0.0.{2 + i % 200}")
        open(f"{args.ready}.{i}", "w").close()
        time.sleep(10**6)
        os._exit(0)
while sum(os.path.exists(f"{args.ready}.{i}") for i in range(args.procs)) < args.procs:
    time.sleep(0.1)
open(args.ready, "w").close()
time.sleep(10**6)
