"""model/assess.port_state: the port's one TCP bind bucket from its holders' kernel records."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from rebind.model.assess import port_state
from rebind.model.conflict import BucketState
from rebind.model.request import BindRequest
from rebind.model.sockstate import BindBucket

BUCKET = BindBucket(11013, 0, 0, None, None, None, None, None, bind2_fastreuse=0, bind2_fastreuseport=0)


def _holder(bucket: BindBucket | None) -> Any:
    return SimpleNamespace(kernel=SimpleNamespace(common=SimpleNamespace(bucket=bucket)))


def test_listeners_on_two_addresses_share_the_port_s_bucket() -> None:
    """Found by the trace oracle test: a plain listener on 0.0.0.0 and a SO_REUSEPORT one on
    [::] show the same inet_bind_bucket but each its own address's bind2 bucket (tb2); the
    port's cache is known, and `why` is not left at "depends on the SO_REUSEPORT cache"."""
    req = BindRequest.create(11013, reuseport=True)
    other = replace(BUCKET, bind2_fastreuseport=2)
    _, port = port_state(req, (_holder(BUCKET), _holder(other)))
    assert port is not None and port.bucket == BucketState(0, 0, None, None, None)


def test_two_different_buckets_stay_unknown() -> None:
    req = BindRequest.create(11013)
    _, port = port_state(req, (_holder(BUCKET), _holder(replace(BUCKET, fastreuse=1))))
    assert port is None
    assert port_state(req, (_holder(None),))[1] is None
