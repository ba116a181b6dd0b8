"""Kernel oracle for the conflict model: `python bench/oracle.py --scenarios 10000 --seed 1`.

Runs random scenarios for real in private network namespaces (needs root) and prints the
agreement rate and every disagreement with its scenario. Exit status 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from oracle_lib import AskCheck, Check, Lab, run_asking, run_scenarios

from rebind.kernel.netns import private_netns

#: Scenarios per namespace (each uses its own port; a fresh namespace drops old TIME_WAITs).
PER_NAMESPACE = 2000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenarios", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=1000, help="print at most this many disagreements")
    ap.add_argument(
        "--asking",
        action="store_true",
        help="instead: the user's real bind with and without `rebind why` first (must not differ)",
    )
    args = ap.parse_args(argv)
    if args.asking:
        return asking(args)
    t0 = time.monotonic()
    checks = 0
    bad: list[Check] = []
    stages: Counter[str] = Counter()
    done = 0
    batch = 0
    while done < args.scenarios:
        n = min(PER_NAMESPACE, args.scenarios - done)
        with private_netns(), Lab() as lab:
            for c in run_scenarios(n, args.seed * 1_000_003 + batch, lab=lab, start=done):
                checks += 1
                stages[f"{c.stage.value}:{'ok' if c.actual is None else 'fail'}"] += 1
                if not c.agree:
                    bad.append(c)
        done += n
        batch += 1
    for c in bad[: args.show]:
        print(c, end="\n\n")
    rate = 100.0 * (checks - len(bad)) / max(checks, 1)
    print(
        f"scenarios {done}  checks {checks}  agree {checks - len(bad)}  disagree {len(bad)}  "
        f"agreement {rate:.3f}%  ({dict(stages)})  {time.monotonic() - t0:.1f} s"
    )
    return 1 if bad else 0


def asking(args: argparse.Namespace) -> int:
    """Asking never changes the answer, and why's verdict, headline and bindable agree."""
    t0 = time.monotonic()
    bad: list[AskCheck] = []
    unstable = 0
    verdicts: Counter[str] = Counter()
    done = batch = 0
    while done < args.scenarios:
        n = min(PER_NAMESPACE, args.scenarios - done)
        with private_netns(), Lab() as lab:
            for c in run_asking(n, args.seed * 1_000_003 + batch, lab=lab, start=done, port_base=20000):
                verdicts[c.verdict] += 1
                unstable += c.unstable
                if not c.same or not c.consistent or c.wrong:
                    bad.append(c)
        done += n
        batch += 1
    for c in bad[: args.show]:
        print(c, end="\n\n")
    print(
        f"scenarios {done}  differences {sum(not c.same for c in bad)}  "
        f"inconsistent {sum(not c.consistent for c in bad)}  wrong {sum(c.wrong for c in bad)}  "
        f"not compared (copies never settled) {unstable}  "
        f"({dict(verdicts)})  {time.monotonic() - t0:.1f} s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
