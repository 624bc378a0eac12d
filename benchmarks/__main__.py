"""Run every benchmark, each in its own process, then draw the chart of docs/benchmarks.md.

    python -m benchmarks --quick            # all of them, under 5 minutes on a 2-core CPU
    python -m benchmarks --only cache_read  # one of them; other options are passed through
    python -m benchmarks --only teacher_pass --quick   # not in the default set
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = ("precompute_overhead", "train_throughput", "cache_read", "storage")  # the default set
EXTRA = ("teacher_pass", "sharing", "chunk_checks", "gpu", "fake_data", "scaling", "data_sources", "interop",
         "binding", "replay", "tinyvit_index")  # run with --only


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the kdcache benchmarks and draw their chart.")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS + EXTRA, default=list(BENCHMARKS))
    parser.add_argument("--chart", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.png"),
                        help="where to write the PNG chart ('' for none)")
    args, passed = parser.parse_known_args()
    failed = []
    for name in args.only:
        began = time.perf_counter()
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *passed])
        print(f"== {name}: {'ok' if code == 0 else f'exit {code}'} in {time.perf_counter() - began:.0f} s", flush=True)
        if code:
            failed.append(name)
    if args.chart:
        from benchmarks.chart import draw

        out_dir = next((passed[i + 1] for i, a in enumerate(passed[:-1]) if a == "--out"), None)
        print(f"chart: {draw(Path(args.chart), Path(out_dir) if out_dir else None)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
