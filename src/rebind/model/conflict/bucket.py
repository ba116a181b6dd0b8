"""The TCP bind bucket's fast-reuse cache (inet_bind_bucket ``fastreuse``, ``fastreuseport``,
``fastuid``, ``fast_rcv_saddr``): when it lets a bind skip the conflict check
(``sk_reuseport_match``), how a successful bind rewrites it (``inet_csk_update_fastreuse``), and
so which trial binds leave it as it was (``probe_is_harmless``)."""

from __future__ import annotations

from dataclasses import replace

from rebind.model.conflict.addresses import bound_kaddr, effective_v6only, rcv_saddr_equal, request_kaddr
from rebind.model.conflict.inputs import (
    FASTREUSEPORT_STRICT,
    BucketState,
    KernelSettings,
    ReuseportCache,
)
from rebind.model.conflict.outcome import Stage
from rebind.model.records import IPAddress, Proto
from rebind.model.request import BindRequest


def cache_match(cache: ReuseportCache | None, req: BindRequest, settings: KernelSettings) -> bool:
    """sk_reuseport_match(): reuseport, same uid, and (STRICT) the cached address covers ours."""
    if cache is None or not req.reuseport or cache.uid != req.uid:
        return False
    if not cache.strict:
        return True  # FASTREUSEPORT_ANY
    cached = bound_kaddr(cache.addr, cache.v6only)
    # ipv{4,6}_rcv_saddr_equal(cached, sk, match_sk1_wildcard=true, match_sk2_wildcard=false)
    return rcv_saddr_equal(cached, request_kaddr(req, settings), True, False)


def fast_path(
    bucket: BucketState | None, req: BindRequest, stage: Stage, settings: KernelSettings
) -> bool | None:
    """Does inet_csk_get_port() skip the conflict check (check_bind_conflict = false)? None: unknown.

    ``(tb->fastreuse > 0 && reuse) || sk_reuseport_match(tb, sk)``, where ``reuse`` is
    SO_REUSEADDR outside TCP_LISTEN (listen() sets the state before it calls get_port). Without
    the bucket: the SO_REUSEADDR path is dead since 6.8 (the bucket is created with
    fastreuse = 0 and inet_csk_update_fastreuse only lowers it once tb->bhash2 is linked; the
    oracle confirms it), but the SO_REUSEPORT cache outlives the socket that set it (it may have
    cleared the flag or closed), so a SO_REUSEPORT bind may take the fast path.
    """
    if req.reuseaddr and stage is Stage.BIND and bucket is not None and (bucket.fastreuse or 0) > 0:
        return True
    return _reuseport_match(bucket, req, settings)


def _reuseport_match(bucket: BucketState | None, req: BindRequest, settings: KernelSettings) -> bool | None:
    """sk_reuseport_match() from whatever fields are known; None when they cannot decide."""
    if not req.reuseport:
        return False
    if bucket is None:
        return None
    frp = bucket.fastreuseport
    if (frp is not None and frp <= 0) or (bucket.fastuid is not None and bucket.fastuid != req.uid):
        return False
    cache = bucket.cache
    return None if cache is None else cache_match(cache, req, settings)


def reuseport_cache_after(
    cache: ReuseportCache | None, *, addr: IPAddress, v6only: bool, uid: int, reuseport: bool
) -> ReuseportCache | None:
    """inet_csk_update_fastreuse() after a successful TCP get_port (bind() or listen()).

    ``v6only`` is the effective flag (see effective_v6only). Accepted children, TIME_WAIT and
    connect() do not call it. A bucket whose last socket left starts again from None.
    """
    if not reuseport:
        return None
    probe = BindRequest(Proto.TCP, addr, 0, reuseport=True, uid=uid, v6only=v6only)
    if cache_match(cache, probe, KernelSettings()):
        return cache
    return ReuseportCache(uid, addr, v6only)


def bucket_after(bucket: BucketState | None, req: BindRequest, settings: KernelSettings) -> BucketState:
    """inet_csk_update_fastreuse() after ``req``'s successful bind() in its port's bucket.

    Since 6.8 the bind2 bucket is linked before the update, so it always takes the "bucket not
    empty" branch: ``tb->fastreuse`` only drops to 0 (without SO_REUSEADDR), and
    ``tb->fastreuseport`` drops to 0 without SO_REUSEPORT, else stays if sk_reuseport_match()
    and is reset to this socket's uid and address (STRICT) otherwise. With the bucket unknown
    the SO_REUSEPORT cache still covers this socket afterwards: it matched, or it was reset.
    """
    fastreuse = bucket.fastreuse if bucket is not None else None
    if not req.reuseaddr:
        fastreuse = 0
    if not req.reuseport:
        return BucketState(fastreuse, 0)
    if bucket is not None and bucket.cache is not None and cache_match(bucket.cache, req, settings):
        return replace(bucket, fastreuse=fastreuse)
    v6only = effective_v6only(req.addr, req.v6only, settings)
    return BucketState(fastreuse, FASTREUSEPORT_STRICT, req.uid, req.addr, v6only)


def probe_is_harmless(
    probe: BindRequest,
    *,
    bucket_exists: bool,
    prober_uid: int,
    bucket: BucketState | None = None,
    settings: KernelSettings | None = None,
) -> bool:
    """Does a trial bind of ``probe`` leave the kernel's answer to EVERY later bind unchanged?

    A failed bind changes nothing (inet_csk_get_port jumps past inet_csk_update_fastreuse). A
    TCP bind that succeeds rewrites the port's bind bucket (one per port and netns, whatever
    the address), and the bucket keeps that state after the probe closes, until its last
    socket leaves. So a probe is harmless only when:

    * it is UDP: udp_lib_get_port keeps no cache (it checks the sockets every time); or
    * no TCP socket is on the port: the probe creates a fresh bucket and destroys it on close
      (inet_put_port -> inet_bind_bucket_destroy); or
    * the bucket's fields are known and the probe's update leaves every one as it is:
      ``tb->fastreuse`` (to 0 without SO_REUSEADDR; -1 counts as a change: connect() reads
      it), and ``tb->fastreuseport`` (to 0 without SO_REUSEPORT; reset to the probe's uid and
      address -- ours, whatever the user asked -- with SO_REUSEPORT unless it already matches).

    An unknown bucket is never harmless: the SO_REUSEPORT cache may hold the uid and address of
    a socket that has since cleared the flag or closed, and a probe bound on *another* address
    clears or resets it for someone else's later bind (issue 17: a bind on 127.0.0.2 took the
    fast path away from a SO_REUSEPORT bind on 127.0.0.1).
    """
    if probe.proto is Proto.UDP or not bucket_exists:
        return True
    if bucket is None:
        return False
    if not probe.reuseaddr and bucket.fastreuse != 0:
        return False
    if not probe.reuseport:
        return bucket.fastreuseport == 0
    cache = bucket.cache
    if cache is None:
        return False
    return cache_match(cache, replace(probe, uid=prober_uid), settings or KernelSettings())
