"""``python -m bench [name ...]``: run every bench/bench_*.py (or the named ones), print one table.

Each module defines ``run() -> list[Result]``; a module that fails is reported, not fatal.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from bench.common import Result, format_table


def main(argv: list[str]) -> int:
    names = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
    wanted = [a if a.startswith("bench_") else f"bench_{a}" for a in argv]
    if wanted:
        names = [n for n in names if n in wanted]
    results: list[Result] = []
    failed: list[str] = []
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name} ...", file=sys.stderr, flush=True)
        try:
            mine = importlib.import_module(f"bench.{name}").run()
            results.extend(mine)
            # one file per benchmark, so running a subset never erases the others' figures
            (out / f"{name}.json").write_text(json.dumps([asdict(r) for r in mine], indent=2))
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"   {name} took {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    print(format_table(results))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
