"""``python -m tests.chaos``: run the chaos scenarios and print one row per scenario.

    python -m tests.chaos                        # every scenario, full length (make chaos)
    python -m tests.chaos --quick                # shorter faults (the subset make test runs)
    python -m tests.chaos --scenario poison --scenario agent-sigkill --json out.json
    python -m tests.chaos --list

Exit code 1 when any row has lost > 0, applied twice > 0, or a failed check (its problems are
printed under the table, with the work directory kept as evidence).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from tests.chaos.catalog import BY_NAME, SCENARIOS
from tests.chaos.checker import Row
from tests.chaos.scenario import run_scenario

COLUMNS = [
    ("scenario", "scenario"),
    ("lost", "lost"),
    ("dup_on_wire", "duplicated-on-wire"),
    ("applied_twice", "applied-twice"),
    ("created", "batches created"),
    ("applied", "applied"),
    ("dropped", "dropped (accounted)"),
    ("released", "released unconfirmed"),
    ("released_lost", "of those, lost by the broker"),
    ("destroyed", "destroyed with the disk"),
    ("readings", "MQTT acked / lost"),
    ("replays", "replays"),
    ("log_losses", "lost logs seen"),
    ("dead_letters", "dead letters"),
    ("duration_s", "duration s"),
    ("verdict", "checks"),
]


def cells(row: Row) -> dict[str, str]:
    out = {k: str(v) for k, v in row.to_json().items() if not isinstance(v, list | dict)}
    out["readings"] = f"{row.mqtt_acked} / {row.readings_lost}"
    out["duration_s"] = f"{row.duration_s:.0f}"
    out["verdict"] = "ok" if row.ok else f"FAILED ({len(row.problems)} problems)"
    return out


def table(rows: list[Row]) -> str:
    """A Markdown table (what docs/reliability.md shows)."""
    lines = [
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for row in rows:
        c = cells(row)
        lines.append("| " + " | ".join(c[k] for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{os.cpu_count()} cores ({model or platform.processor()}){mem}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


async def main_async(args: argparse.Namespace) -> int:
    chosen = [BY_NAME[n] for n in args.scenario] if args.scenario else list(SCENARIOS)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    rows: list[Row] = []
    for scn in chosen:
        logging.getLogger("chaos").info("=== %s%s ===", scn.name, " (quick)" if args.quick else "")
        row = await run_scenario(scn, quick=args.quick, seed=args.seed, keep=args.keep)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    total = time.monotonic() - t0
    print()
    print(f"chaos suite{' (quick)' if args.quick else ''}: {started}, {machine()}")
    print(f"total {total:.0f} s, seed {args.seed}")
    print()
    print(table(rows))
    for row in rows:
        print()
        print(f"{row.scenario}: {row.faults}")
        for p in row.problems:
            print(f"  PROBLEM: {p}")
        for k, v in row.examples.items():
            print(f"  {k}: {v}")
        for n in row.notes:
            print(f"  {n}")
    if args.json:
        report = {
            "started": started,
            "machine": machine(),
            "quick": args.quick,
            "seed": args.seed,
            "duration_s": round(total, 1),
            "rows": [r.to_json() for r in rows],
        }
        await asyncio.to_thread(
            Path(args.json).write_text, json.dumps(report, indent=2, default=str)
        )
    return 0 if all(r.ok for r in rows) else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(BY_NAME),
        metavar="NAME",
        help="run this scenario (repeatable; default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter faults")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--seed", type=int, default=13, help="seed of the fault timings")
    parser.add_argument(
        "--keep", action="store_true", help="keep work directories of rows that passed"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the rig's steps")
    args = parser.parse_args()
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:24} {'quick ' if s.quick else '      '}{s.summary}")
        return
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("chaos").setLevel(logging.INFO)
    for noisy in ("aiokafka", "httpx", "asyncua"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
