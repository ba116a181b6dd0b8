"""One error base that says whose fault it is (as h11 does), and the exit code the CLI uses."""

from __future__ import annotations

import enum


class Fault(enum.Enum):
    USER = "user"  # bad input: fix the command line or the call
    ENVIRONMENT = "environment"  # missing permission, kernel feature or tool
    KERNEL = "kernel"  # the kernel answered something we cannot use
    BUG = "bug"  # rebind got it wrong


class ExitCode(enum.IntEnum):
    OK = 0
    NO_MATCH = 1  # nothing matched / port busy / timed out: a normal, scriptable "no"
    USAGE = 2
    ENVIRONMENT = 3
    KERNEL = 4
    REFUSED = 5  # rebind will not act: PID 1, itself, another user's process, a container proxy
    BUG = 70  # EX_SOFTWARE


_EXIT = {
    Fault.USER: ExitCode.USAGE,
    Fault.ENVIRONMENT: ExitCode.ENVIRONMENT,
    Fault.KERNEL: ExitCode.KERNEL,
    Fault.BUG: ExitCode.BUG,
}


class RebindError(Exception):
    fault: Fault = Fault.BUG

    @property
    def exit_code(self) -> int:
        return int(_EXIT[self.fault])


class UsageError(RebindError, ValueError):
    fault = Fault.USER


class EnvironmentProblem(RebindError):
    fault = Fault.ENVIRONMENT


class KernelError(RebindError):
    fault = Fault.KERNEL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class CodecError(KernelError):
    """Netlink bytes that do not parse: truncated, misaligned or inconsistent."""
