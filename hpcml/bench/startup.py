"""Start-up and resume time: launch to the end of the first training step, as the user waits for it.

- start-up: `mpirun -np 2 python jobs/train.py` (Hydra config, validation, MPI bootstrap, rendezvous,
  data, DDP, transport probe) against `mpirun -np 2 python -m hpcml.bench.bare_ddp`, a bare
  torch.distributed script (fixed MASTER_PORT, no config, no data), both timed from just before `mpirun`
  starts to the unix time rank 0 finished its first step;
- resume: the same hpcml command with a verified checkpoint to restore (model of about 100 MB of state)
  against the same command starting cold (`checkpoint.resume=none`).
Runs alternate, best of a few, so drift hits both alike.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpcml.bench.launch import BenchmarkError, Layout, worker_env
from hpcml.bench.record import BenchResult, Figure

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "jobs" / "train.py"
# About 100 MB of checkpointed state (weights + SGD momentum) for the resume measurement.
RESUME_MODEL = ["model.width=2048", "model.depth=3", "optim.name=sgd", "optim.momentum=0.9"]


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


def run(quick: bool, workdir: Path) -> BenchResult:
    repeats = 1 if quick else 4
    layout = Layout.local(2)
    result = BenchResult("startup", quick, {"repeats": repeats, "layout": layout.name})
    scratch = workdir / "outputs" / "bench-startup"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        # One short run leaves the checkpoint that every resume measurement restores (step 2 of 4).
        seed = scratch / "seed"
        hpcml_start(layout, seed, [*RESUME_MODEL, "train.steps=2"])
        checkpoint = seed / "checkpoints" / "step-2"
        resume_args = [*RESUME_MODEL, "train.steps=3"]
        best = {k: float("inf") for k in ("hpcml", "bare", "cold", "resume")}
        for i in range(repeats):
            best["bare"] = min(best["bare"], bare_start(layout, scratch / f"bare-{i}"))
            best["hpcml"] = min(best["hpcml"], hpcml_start(layout, scratch / f"hpcml-{i}", ["train.steps=1"]))
            cold = hpcml_start(layout, scratch / f"cold-{i}", [*resume_args, "checkpoint.resume=none"])
            best["cold"] = min(best["cold"], cold)
            resumed = hpcml_start(layout, scratch / f"resume-{i}", [*resume_args, f"checkpoint.resume={checkpoint}"])
            best["resume"] = min(best["resume"], resumed)
        state_bytes = sum(f.stat().st_size for f in checkpoint.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.measurements.append({**{f"{k}_s": v for k, v in best.items()}, "checkpoint_bytes": state_bytes})
    result.figures += [
        Figure("startup", f"launch to first step, {layout.name}", "s", best["hpcml"], "bare torch.distributed script",
               best["bare"], higher_is_better=False),
        Figure("startup", f"launch to first step after restoring {state_bytes / 2**20:.0f} MB", "s", best["resume"],
               "cold start, same command", best["cold"], higher_is_better=False),
    ]  # fmt: skip
    return result
