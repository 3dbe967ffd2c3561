"""Run the benchmarks: `python -m benchmarks [NAME ...]` (default: all).

Each module ``benchmarks/bench_<name>.py`` has ``run(workdir: Path) -> None``, which starts what
it needs on loopback, measures the subject and its baseline in the same run, prints medians and
ratios, and writes its figures as JSON to ``workdir/<name>.json``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks


def main(argv: list[str]) -> int:
    names = sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )
    wanted = argv or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(names)}")
        return 2
    workdir = Path(".bench").resolve()
    workdir.mkdir(exist_ok=True)
    for name in wanted:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        module.run(workdir)
        print(f"=== {name}: {time.monotonic() - started:.0f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
