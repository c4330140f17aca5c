"""Start-up and resume time: launch to the end of the first training step, as the user waits for it.

- start-up: `mpirun -np 2 python jobs/train.py` (Hydra config, validation, MPI bootstrap, rendezvous,
  data, DDP, transport probe) against `mpirun -np 2 python -m hpcml.bench.bare_ddp`, a bare
  torch.distributed script (fixed MASTER_PORT, no config, no data), both timed from just before `mpirun`
  starts to the unix time rank 0 finished its first step;
- resume: the same hpcml command with a verified checkpoint to restore (a 2048-wide MLP with SGD momentum;
  the figure names the checkpoint's size on disk) against the same command starting cold
  (`checkpoint.resume=none`). Both with `train.transport=torch`, so neither probes the transports (a
  resume would otherwise reuse its checkpoint's plan and skip the probe the cold start pays), and both
  after one untimed run of each, dropping nothing from the page cache: code, data and checkpoint are
  cached alike, so the difference is the restore itself.
Runs alternate in rounds, so drift hits both alike; each figure is the median round, with the spread.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hpcml.bench.launch import BenchmarkError, Layout, worker_env
from hpcml.bench.record import BenchResult, Figure

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "jobs" / "train.py"
# A checkpoint of tens of MB (weights + SGD momentum) for the resume measurement. The transport is fixed so
# that cold start and resume do the same start-up work but for the restore: no probe for either.
RESUME_MODEL = ["model.width=2048", "model.depth=3", "optim=sgd", "optim.momentum=0.9", "train.transport=torch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd: list[str], env: dict[str, str], result_file: Path) -> float:
    result_file.unlink(missing_ok=True)
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not result_file.is_file():
        raise BenchmarkError(f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(result_file.read_text())["first_step_at"] - started


def hpcml_start(layout: Layout, out: Path, extra: list[str]) -> float:
    # gloo, as the bare script uses (on a GPU node, auto would pick NCCL and put both ranks on one GPU).
    args = [f"train.output_dir={out}", f"hydra.run.dir={out}", "train.backend=gloo", *extra]
    cmd = [*layout.prefix, sys.executable, str(TRAIN), *args]
    return _timed(cmd, worker_env(), out / "result.json")


def bare_start(layout: Layout, out: Path) -> float:
    env = {**worker_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*layout.prefix, sys.executable, "-m", "hpcml.bench.bare_ddp", str(out / "first_step.json")]
    return _timed(cmd, env, out / "first_step.json")


def checkpoint_bytes(checkpoint: Path) -> int:
    """Bytes on disk of every file in the checkpoint folder a resume reads (state, RNG states, manifest)."""
    return sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())


def run(quick: bool, workdir: Path) -> BenchResult:
    repeats = 1 if quick else 4
    layout = Layout.local(2)
    result = BenchResult(
        "startup",
        quick,
        {
            "repeats": repeats,
            "layout": layout.name,
            "resume_and_cold_args": RESUME_MODEL,
            "page_cache": "as left by the seed run" if quick else "warm, both",
        },
    )
    scratch = workdir / "outputs" / "bench-startup"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        # One short run leaves the checkpoint that every resume measurement restores (step 2 of 3).
        seed = scratch / "seed"
        hpcml_start(layout, seed, [*RESUME_MODEL, "train.steps=2"])
        checkpoint = seed / "checkpoints" / "step-2"
        state_bytes = checkpoint_bytes(checkpoint)
        cold_args = [*RESUME_MODEL, "train.steps=3", "checkpoint.resume=none"]
        resume_args = [*RESUME_MODEL, "train.steps=3", f"checkpoint.resume={checkpoint}"]
        if not quick:
            # Untimed: one of each, so that both timed commands find the page cache as the other does. (The
            # quick run, which only proves the benchmark works, skips them: its figures are not judged.)
            hpcml_start(layout, scratch / "warm-cold", cold_args)
            hpcml_start(layout, scratch / "warm-resume", resume_args)
        rounds: dict[str, list[float]] = {k: [] for k in ("bare", "hpcml", "cold", "resume")}
        for i in range(repeats):
            rounds["bare"].append(bare_start(layout, scratch / f"bare-{i}"))
            rounds["hpcml"].append(hpcml_start(layout, scratch / f"hpcml-{i}", ["train.steps=1"]))
            rounds["cold"].append(hpcml_start(layout, scratch / f"cold-{i}", cold_args))
            rounds["resume"].append(hpcml_start(layout, scratch / f"resume-{i}", resume_args))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.measurements.append(
        {
            **{f"{k}_s": statistics.median(v) for k, v in rounds.items()},
            "rounds_s": rounds,
            "checkpoint_bytes": state_bytes,
            "resume_transport": "torch (no probe), cold start the same",
        }
    )
    result.figures += [
        Figure.from_rounds("startup", f"launch to first step, {layout.name}", "s", rounds["hpcml"],
                           "bare torch.distributed script", rounds["bare"], higher_is_better=False),
        Figure.from_rounds("startup", f"launch to first step after restoring a {state_bytes / 2**20:.1f} MiB checkpoint "
                           f"({state_bytes} bytes on disk; no probe either way)", "s", rounds["resume"],
                           "cold start, same command", rounds["cold"], higher_is_better=False),
    ]  # fmt: skip
    return result
