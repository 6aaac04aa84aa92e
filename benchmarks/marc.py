"""MARC benchmark: lost edits and makespan of five coordination modes, at a larger size.

Runs the seeded simulation of :mod:`klock_async.marc` (N agents, K read-think-write edits
each, F shared files) in its five modes and prints the table: intended edits, lost edits,
lost %, makespan and makespan relative to mode 4 (one global lock), edits redone because
their write was refused after the thinking, Wait-Die deaths, and the stale writes the kernel
refused. With ``--seeds N`` it runs N consecutive seeds and ends with
the range of each figure over them.

Run from the repository root::

    python benchmarks/marc.py                       # 16 agents, 8 files, 50 edits each
    python benchmarks/marc.py --seeds 5             # the same for seeds 0..4, plus a summary
    python benchmarks/marc.py --agents 32 --files 4 --edits 20
    python benchmarks/marc.py --quick               # tiny size: checks the script works

Exit status 1 if mode 3 (SERIALIZABLE sessions), mode 4 or mode 5 (edits declared up front)
lost an edit, which must not happen.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
from collections.abc import Sequence

from klock_async.logging import configure
from klock_async.marc import Mode, ModeResult, Scenario, format_table, run_all, verdict

QUICK = {"agents": 4, "files": 2, "edits": 3}


def summary(runs: Sequence[Sequence[ModeResult]]) -> str:
    """Range (min-max) over seeds of lost %, makespan relative to mode 4 and redone edits."""
    lines = [f"over {len(runs)} seeds (min-max):"]
    for mode in Mode:
        rows = [next(r for r in results if r.mode is mode) for results in runs]
        baselines = [next(r for r in results if r.mode is Mode.GLOBAL_LOCK) for results in runs]
        lost = [r.lost_percent for r in rows]
        relative = [r.makespan / b.makespan for r, b in zip(rows, baselines, strict=True)]
        redone = [r.redone for r in rows]
        lines.append(
            f"  {mode.label:<28} lost {min(lost):5.1f}-{max(lost):5.1f} %   "
            f"makespan {min(relative):.2f}-{max(relative):.2f}x mode 4   "
            f"redone {min(redone)}-{max(redone)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the modes and print the table(s)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=16, help="agents (default 16)")
    parser.add_argument("--files", type=int, default=8, help="shared files (default 8)")
    parser.add_argument("--edits", type=int, default=50, help="edits per agent (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=1, help="consecutive seeds (default 1)")
    parser.add_argument(
        "--think-min", type=float, default=0.002, help="shortest think time, s (default 0.002)"
    )
    parser.add_argument(
        "--think-max", type=float, default=0.010, help="longest think time, s (default 0.010)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny size, for a smoke test")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    sizes = QUICK if args.quick else {"agents": args.agents, "files": args.files}
    try:
        scenarios = [
            Scenario(
                agents=sizes["agents"],
                files=sizes["files"],
                edits=QUICK["edits"] if args.quick else args.edits,
                seed=seed,
                think_min=args.think_min,
                think_max=args.think_max,
            )
            for seed in range(args.seed, args.seed + args.seeds)
        ]
    except ValueError as exc:
        parser.error(str(exc))
    configure("error")  # the kernel's lease and clock events would drown the table

    first = scenarios[0]
    command = "python benchmarks/marc.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    print(f"$ {command}")
    print(
        f"{first.agents} agents x {first.edits} edits on {first.files} files, think time "
        f"{first.think_min * 1000:g}-{first.think_max * 1000:g} ms; "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}"
    )
    runs = []
    for scenario in scenarios:
        results = asyncio.run(run_all(scenario))
        runs.append(results)
        print()
        print(f"seed {scenario.seed}")
        print(format_table(results))
        print(verdict(results))
    if len(runs) > 1:
        print()
        print(summary(runs))
    safe = (Mode.SERIALIZABLE, Mode.GLOBAL_LOCK, Mode.DECLARED_UP_FRONT)
    return 0 if all(r.lost == 0 for rs in runs for r in rs if r.mode in safe) else 1


if __name__ == "__main__":
    sys.exit(main())
