"""rebind: who holds a port, why bind() fails with EADDRINUSE, when it frees, and how to fix it.

The public API is the names in ``__all__``: functions, their result types, the enums in them and
the errors; submodules are internal. ``import rebind`` stays cheap: public names are resolved on
first use through ``_LAZY`` (name -> module), so the CLI and scripts pay only for what they touch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rebind._version import __version__

if TYPE_CHECKING:  # for type checkers only; at run time names resolve lazily through _LAZY
    from rebind.actions.free import execute_plan as execute_plan
    from rebind.actions.free import free as free
    from rebind.actions.free import plan_free as plan_free
    from rebind.actions.pick import NoPortFree as NoPortFree
    from rebind.actions.pick import PickedPort as PickedPort
    from rebind.actions.pick import PortRiskWarning as PortRiskWarning
    from rebind.actions.pick import pick_port as pick_port
    from rebind.actions.wait import NotWaitable as NotWaitable
    from rebind.actions.wait import WaitResult as WaitResult
    from rebind.actions.wait import wait_bindable as wait_bindable
    from rebind.actions.wait import wait_bindable_async as wait_bindable_async
    from rebind.actions.wait import wait_listening as wait_listening
    from rebind.actions.wait import wait_listening_async as wait_listening_async
    from rebind.allns import socket_table_all_netns as socket_table_all_netns
    from rebind.connect_diagnosis import ConnectDiagnosis as ConnectDiagnosis
    from rebind.connect_diagnosis import connect_diagnose as connect_diagnose
    from rebind.diagnosis import Attempt as Attempt
    from rebind.diagnosis import BlockerInfo as BlockerInfo
    from rebind.diagnosis import Diagnosis as Diagnosis
    from rebind.diagnosis import default_request as default_request
    from rebind.diagnosis import diagnose as diagnose
    from rebind.errors import EnvironmentProblem as EnvironmentProblem
    from rebind.errors import ExitCode as ExitCode
    from rebind.errors import Fault as Fault
    from rebind.errors import KernelError as KernelError
    from rebind.errors import RebindError as RebindError
    from rebind.errors import UsageError as UsageError
    from rebind.exporter.collector import RebindCollector as RebindCollector
    from rebind.exporter.facts import Dest as Dest
    from rebind.exporter.facts import Watch as Watch
    from rebind.model.conflict import BindRequest as BindRequest
    from rebind.model.conflict import Verdict as Verdict
    from rebind.model.connect import ConnectRequest as ConnectRequest
    from rebind.model.connect import ConnectResult as ConnectResult
    from rebind.model.containers import ContainerRef as ContainerRef
    from rebind.model.containers import Engine as Engine
    from rebind.model.containers import ProxyKind as ProxyKind
    from rebind.model.diagnosis import HolderKind as HolderKind
    from rebind.model.free import FreePlan as FreePlan
    from rebind.model.free import Obstacle as Obstacle
    from rebind.model.free import ObstacleKind as ObstacleKind
    from rebind.model.free import Refusal as Refusal
    from rebind.model.free import Refused as Refused
    from rebind.model.free import Target as Target
    from rebind.model.free_result import Fate as Fate
    from rebind.model.free_result import FreeResult as FreeResult
    from rebind.model.free_result import ProcessOutcome as ProcessOutcome
    from rebind.model.free_result import SocketFate as SocketFate
    from rebind.model.free_result import SocketOutcome as SocketOutcome
    from rebind.model.records import Endpoint as Endpoint
    from rebind.model.records import Owner as Owner
    from rebind.model.records import OwnerScanReport as OwnerScanReport
    from rebind.model.records import Proto as Proto
    from rebind.model.records import SocketEntry as SocketEntry
    from rebind.model.records import SocketRecord as SocketRecord
    from rebind.model.records import SocketTable as SocketTable
    from rebind.model.records import State as State
    from rebind.model.records import Timer as Timer
    from rebind.sockets import socket_table as socket_table
    from rebind.supervisor.listen import InheritedSocket as InheritedSocket
    from rebind.supervisor.listen import inherited_sockets as inherited_sockets
    from rebind.supervisor.listen import listen as listen
    from rebind.supervisor.listen import notify as notify
    from rebind.supervisor.listen import notify_ready as notify_ready
    from rebind.supervisor.listen import start_server as start_server

_LAZY: dict[str, str] = {
    # errors (every one derives from RebindError; exit_code is the CLI's)
    "RebindError": "rebind.errors",
    "UsageError": "rebind.errors",
    "EnvironmentProblem": "rebind.errors",
    "KernelError": "rebind.errors",
    "Fault": "rebind.errors",
    "ExitCode": "rebind.errors",
    # the socket table
    "socket_table": "rebind.sockets",
    "SocketTable": "rebind.model.records",
    "SocketEntry": "rebind.model.records",
    "SocketRecord": "rebind.model.records",
    "Endpoint": "rebind.model.records",
    "Owner": "rebind.model.records",
    "OwnerScanReport": "rebind.model.records",
    "Proto": "rebind.model.records",
    "State": "rebind.model.records",
    "Timer": "rebind.model.records",
    # diagnosis (`rebind why`)
    "diagnose": "rebind.diagnosis",
    "default_request": "rebind.diagnosis",
    "Diagnosis": "rebind.diagnosis",
    "BlockerInfo": "rebind.diagnosis",
    "Attempt": "rebind.diagnosis",
    "BindRequest": "rebind.model.conflict",
    "Verdict": "rebind.model.conflict",
    "HolderKind": "rebind.model.diagnosis",
    # actions
    "wait_bindable": "rebind.actions.wait",
    "wait_listening": "rebind.actions.wait",
    "wait_bindable_async": "rebind.actions.wait",
    "wait_listening_async": "rebind.actions.wait",
    "WaitResult": "rebind.actions.wait",
    "NotWaitable": "rebind.actions.wait",
    "free": "rebind.actions.free",
    "plan_free": "rebind.actions.free",
    "execute_plan": "rebind.actions.free",
    "FreePlan": "rebind.model.free",
    "FreeResult": "rebind.model.free_result",
    "Target": "rebind.model.free",
    "Refused": "rebind.model.free",
    "Refusal": "rebind.model.free",
    "ProcessOutcome": "rebind.model.free_result",
    "Fate": "rebind.model.free_result",
    "SocketOutcome": "rebind.model.free_result",
    "SocketFate": "rebind.model.free_result",
    "Obstacle": "rebind.model.free",
    "ObstacleKind": "rebind.model.free",
    "pick_port": "rebind.actions.pick",
    "PickedPort": "rebind.actions.pick",
    "NoPortFree": "rebind.actions.pick",
    "PortRiskWarning": "rebind.actions.pick",
    # the client side: why --connect
    "connect_diagnose": "rebind.connect_diagnosis",
    "ConnectDiagnosis": "rebind.connect_diagnosis",
    "ConnectRequest": "rebind.model.connect",
    "ConnectResult": "rebind.model.connect",
    # every namespace and container
    "socket_table_all_netns": "rebind.allns",
    "ContainerRef": "rebind.model.containers",
    "Engine": "rebind.model.containers",
    "ProxyKind": "rebind.model.containers",
    # Prometheus (needs the `exporter` extra: prometheus-client)
    "RebindCollector": "rebind.exporter.collector",
    "Watch": "rebind.exporter.facts",
    "Dest": "rebind.exporter.facts",
    # supervisor
    "listen": "rebind.supervisor.listen",
    "start_server": "rebind.supervisor.listen",
    "inherited_sockets": "rebind.supervisor.listen",
    "InheritedSocket": "rebind.supervisor.listen",
    "notify": "rebind.supervisor.listen",
    "notify_ready": "rebind.supervisor.listen",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rebind' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
