"""`python -m hpcml.bench [--quick] [--only NAME ...]`: run the benchmarks, write bench/results/.

Each benchmark writes `<results-dir>/<name>.json`; the Markdown table of every result there is written
to `<results-dir>/summary.md` and printed. `make bench` runs the full set; `make bench-quick` (and the
test suite) the quick one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

from hpcml.bench.launch import BenchmarkError, BenchmarkSkipped
from hpcml.bench.record import write_summary

# name -> module with `run(quick, workdir) -> BenchResult`, in the order they run.
BENCHMARKS = {
    "allreduce": "hpcml.bench.allreduce",
    "training": "hpcml.bench.training",
    "seam": "hpcml.bench.seam",
    "lm": "hpcml.bench.lm",
    "sharding": "hpcml.bench.sharding",
    "host_memory": "hpcml.bench.host_memory",
    "checkpoints": "hpcml.bench.checkpoints",
    "startup": "hpcml.bench.startup",
    "submission": "hpcml.bench.submission",
    "tuning": "hpcml.bench.tuning",
    "gpu": "hpcml.bench.gpu",  # skipped without a CUDA device
}
# The ones that submit to a Slurm cluster (`make cluster-up`); the rest run on this machine alone.
NEEDS_CLUSTER = ("submission", "tuning")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcml.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (minutes, for CI)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these benchmarks")
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path.cwd()
    failed = []
    for name in args.only or list(BENCHMARKS):
        started = time.perf_counter()
        print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
        try:
            result = importlib.import_module(BENCHMARKS[name]).run(args.quick, workdir)
        except BenchmarkSkipped as err:
            print(f"   skipped: {err}", flush=True)
            (args.results_dir / f"{name}.json").unlink(missing_ok=True)
            continue
        except BenchmarkError as err:
            print(f"!! {name} failed: {err}", file=sys.stderr, flush=True)
            failed.append(name)
            # An older result would otherwise sit in the summary as if it were this run's.
            (args.results_dir / f"{name}.json").unlink(missing_ok=True)
            continue
        path = result.write(args.results_dir)
        print(f"   {len(result.figures)} figures -> {path} ({time.perf_counter() - started:.0f}s)", flush=True)
    summary = write_summary(args.results_dir)
    print(summary.read_text())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
