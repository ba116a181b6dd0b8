"""Kernel oracle for the client-side model: `python bench/connect_oracle.py --scenarios 5000 --seed 1`.

Every scenario runs in its own fresh network namespace (needs root); see rebind.connect_oracle.
Prints the agreement rate, the outcome mix and every disagreement. Exit status 1 on any
disagreement.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from connect_oracle_lib import Check, run_scenarios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenarios", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=50, help="print at most this many disagreements")
    ap.add_argument(
        "--blind",
        choices=("no", "summary", "lookups", "sockets"),
        default="no",
        help="feed the model what `why --connect` reads instead of the ground truth: the range "
        "from the bind hash (summary, as the CLI), that with the named sockets by lookups "
        "(lookups, as `rebind trace`) or every socket of it (sockets)",
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    bad: list[Check] = []
    mix: Counter[str] = Counter()
    skipped = 0
    n = 0
    blind = args.blind != "no"
    lookups = args.blind == "lookups"
    if lookups:
        from rebind.kernel.bindhash_table import calibrate_hz

        if calibrate_hz() is None:
            print("HZ could not be calibrated: the lookups cannot run here", file=sys.stderr)
            return 2
    summary = args.blind in ("summary", "lookups")
    for c in run_scenarios(args.scenarios, args.seed, blind=blind, summary=summary, lookups=lookups):
        n += 1
        if c.skipped:
            skipped += 1
            continue
        actual = "ok" if c.actual_ok else c.actual_errno
        mix[
            f"{c.scenario.proto.value}/{c.scenario.probe.how.value}: model {c.verdict.value} kernel {actual}"
        ] += 1
        if not c.agree:
            bad.append(c)
    for c in bad[: args.show]:
        print(c, end="\n\n")
    checked = n - skipped
    rate = 100.0 * (checked - len(bad)) / max(checked, 1)
    for k, v in sorted(mix.items()):
        print(f"  {v:6d}  {k}")
    print(
        f"scenarios {n}  checked {checked}  skipped {skipped}  agree {checked - len(bad)}  "
        f"disagree {len(bad)}  agreement {rate:.3f}%  {time.monotonic() - t0:.1f} s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
