"""`rebind top`'s bindable column against the kernel (issue 17: one assessment with the same
kernel state `why` reads -- the sockets' own flags, the TCP bind bucket, the UDP chain order).

Each case leaves a server's TIME_WAIT on the port (the server is gone), samples the port as
`top` does (Sampler.sample), then asks the kernel with real binds: model == kernel.
"""

from __future__ import annotations

import socket

import pytest

from rebind.kernel.bpf.sockiter import prepare
from rebind.model.records import Proto
from rebind.model.sockstate import Unavailable
from rebind.top.model import Bindable, PortKey
from rebind.top.sampler import Sampler


def _server_time_wait(port: int, reuseaddr: bool, reuseport: bool) -> None:
    """A server accepts a client and closes first: a TIME_WAIT on (127.0.0.1, port) carrying the
    server's sk_reuse / sk_reuseport (inet_twsk_alloc copies them); then the server is gone."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
    srv.bind(("0.0.0.0", port))
    srv.listen()
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = srv.accept()
    a.close()
    c.recv(1)
    c.close()
    srv.close()


def _binds(port: int, reuseaddr: bool) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
    try:
        s.bind(("0.0.0.0", port))
        s.listen()
        return True
    except OSError:
        return False
    finally:
        s.close()


def _kernel_says(port: int) -> Bindable:
    """What top's question (plain bind + listen on 0.0.0.0, then with SO_REUSEADDR) gets."""
    if _binds(port, reuseaddr=False):
        return Bindable.YES
    return Bindable.REUSEADDR if _binds(port, reuseaddr=True) else Bindable.NO


@pytest.mark.parametrize(
    ("reuseaddr", "reuseport"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["seed-plain-server", "reuseaddr-server", "reuseport-server", "both"],
)
def test_top_bindable_equals_the_kernel_after_a_servers_time_wait(netns, reuseaddr, reuseport):
    """Before: the TIME_WAIT's flags were unknown to top, so a SO_REUSEADDR server's port showed
    "✗" where a SO_REUSEADDR restart binds. Now its tw_reuse is read (BPF lookup by 4-tuple)."""
    if isinstance(got := prepare(), Unavailable):
        pytest.skip(f"the BPF socket iterator cannot run here: {got.reason}")
    port = 18700
    _server_time_wait(port, reuseaddr, reuseport)
    view = Sampler([port], owners=False).sample().by_key()[PortKey(port, Proto.TCP)]
    assert view.bindable is not Bindable.UNKNOWN
    assert view.bindable is _kernel_says(port)  # model == kernel (asked after the sample)
