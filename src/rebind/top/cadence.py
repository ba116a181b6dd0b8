"""How often each costly part of a refresh runs: a CPU budget per job. Pure.

On an idle machine every job is cheap and runs at every refresh. On a large socket table some
kernel walks cost more than a refresh may (bench/top.py: the bhash2 walk behind bound-inactive
sockets, the established-hash walk behind TIME_WAIT and connections, the owner scan), so each
such job runs no more often than its measured cost allows under its share of the budget; the
view extrapolates countdowns in between and says how old each part is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: CPU seconds per wall second a job may use on average (its share of the refresh budget).
DEFAULT_SHARE = 0.010
#: A job never waits longer than this, whatever its cost (the data must not go stale forever).
MAX_PERIOD = 30.0


@dataclass(slots=True)
class Job:
    share: float = DEFAULT_SHARE
    last_run: float | None = None
    last_cost: float = 0.0
    #: Run at the next refresh whatever the budget says (e.g. a new socket needs its owners).
    forced: bool = False

    def period(self, interval: float) -> float:
        return min(max(interval, self.last_cost / self.share), max(MAX_PERIOD, interval))

    def due(self, now: float, interval: float) -> bool:
        if self.forced or self.last_run is None:
            return True
        # A little slack: a refresh that fires a few ms early must not skip a whole period.
        return now - self.last_run >= self.period(interval) - min(0.05, interval / 10)

    def ran(self, now: float, cost: float) -> None:
        self.last_run, self.last_cost, self.forced = now, cost, False

    def age(self, now: float) -> float | None:
        return None if self.last_run is None else now - self.last_run


@dataclass(slots=True)
class Cadence:
    interval: float
    jobs: dict[str, Job] = field(default_factory=dict)

    def job(self, name: str, share: float = DEFAULT_SHARE) -> Job:
        return self.jobs.setdefault(name, Job(share))

    def due(self, name: str, now: float) -> bool:
        return self.job(name).due(now, self.interval)

    def slowed(self) -> dict[str, float]:
        """Jobs running less often than every refresh, with their period in seconds."""
        out = {}
        for name, j in self.jobs.items():
            p = j.period(self.interval)
            if p > self.interval * 1.5:
                out[name] = p
        return out
