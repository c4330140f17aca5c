"""The training loop: each rank trains on its slice of the global batch, gradients are averaged."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hpcml.config import TrainJobConfig
from hpcml.data import GlobalBatchStream, load_dataset
from hpcml.dist import DistributedContext
from hpcml.gradsync import make_gradient_sync
from hpcml.metrics import MetricsWriter
from hpcml.models import build_mlp

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
MODEL_FILE = "model.pt"


@dataclass
class TrainingResult:
    steps: int
    final_loss: float
    test_accuracy: float
    params_sha256: str
    world_size: int
    num_nodes: int
    backend: str
    grad_sync: str
    launcher: str
    samples_per_s: float
    elapsed_s: float
    output_dir: str


def parameters_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes in order: equal on all ranks iff the replicas are identical."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_optimizer(cfg: TrainJobConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


class Trainer:
    def __init__(self, cfg: TrainJobConfig, ctx: DistributedContext):
        self.cfg = cfg
        self.ctx = ctx
        self.output_dir = Path(self._agreed_output_dir(cfg.train.output_dir))
        self.data = load_dataset(cfg.data)
        self.stream = GlobalBatchStream(len(self.data.x_train), cfg.train.global_batch_size, cfg.train.seed)
        # Same seed on every rank: identical initial weights even before DDP's broadcast.
        torch.manual_seed(cfg.train.seed)
        self.model = build_mlp(cfg.model, self.data.input_dim, self.data.num_classes).to(ctx.device)
        self.sync = make_gradient_sync(self.model, ctx, cfg.train)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.step = 0

    def _agreed_output_dir(self, mine: str) -> str:
        """Rank 0's output directory, for everyone (launchers may give ranks different working dirs)."""
        box = [str(Path(mine).resolve())]
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def train_step(self) -> torch.Tensor:
        idx = torch.from_numpy(self.stream.rank_batch(self.step, self.ctx.rank, self.ctx.world_size))
        x = self.data.x_train[idx].to(self.ctx.device, non_blocking=True)
        y = self.data.y_train[idx].to(self.ctx.device, non_blocking=True)
        self.sync.zero_grad(self.optimizer)
        loss = F.cross_entropy(self.sync.module(x), y)
        loss.backward()
        self.sync.synchronize()
        self.optimizer.step()
        self.step += 1
        fault = self.cfg.fault
        if fault.raise_at_step == self.step and fault.rank == self.ctx.rank:
            raise RuntimeError(f"injected fault on rank {self.ctx.rank} at step {self.step} (fault.raise_at_step)")
        return loss.detach()

    def global_mean(self, value: torch.Tensor) -> float:
        if self.ctx.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.ctx.world_size
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        logits = self.model(self.data.x_test.to(self.ctx.device))
        self.model.train()
        return float((logits.argmax(dim=1).cpu() == self.data.y_test).float().mean())

    def fit(self) -> TrainingResult:
        cfg = self.cfg.train
        metrics = MetricsWriter(self.output_dir, self.ctx.is_main, cfg.steps, self.step)
        start = window_start = time.perf_counter()
        window_steps = 0
        loss = torch.zeros(())
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                window_steps += 1
                metrics.advance()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics.write(
                        self.step,
                        {
                            "loss": self.global_mean(loss),
                            "samples_per_s": window_steps * cfg.global_batch_size / max(elapsed, 1e-9),
                            "epoch": self.stream.samples_consumed(self.step) / self.stream.num_samples,
                        },
                    )
                    window_start, window_steps = time.perf_counter(), 0
            accuracy = self.evaluate()
            elapsed = time.perf_counter() - start
            metrics.write(self.step, {"test_accuracy": accuracy})
        finally:
            metrics.close()
        result = TrainingResult(
            steps=self.step,
            final_loss=self.global_mean(loss),
            test_accuracy=accuracy,
            params_sha256=parameters_checksum(self.model),
            world_size=self.ctx.world_size,
            num_nodes=self.ctx.placement.num_nodes,
            backend=self.ctx.backend,
            grad_sync=cfg.grad_sync,
            launcher=self.ctx.launcher,
            samples_per_s=cfg.steps * cfg.global_batch_size / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            output_dir=str(self.output_dir),
        )
        self._write_result(result)
        return result

    def _write_result(self, result: TrainingResult) -> None:
        """Every rank's checksum goes into result.json, so a diverged replica cannot hide."""
        checksums = [result.params_sha256]
        if self.ctx.world_size > 1:
            checksums = [None] * self.ctx.world_size
            dist.all_gather_object(checksums, result.params_sha256)
        if not self.ctx.is_main:
            return
        self._write_atomically(self.output_dir / MODEL_FILE, lambda f: torch.save(self.model.state_dict(), f))
        record = {**asdict(result), "rank_params_sha256": checksums, "replicas_identical": len(set(checksums)) == 1}
        self._write_atomically(
            self.output_dir / RESULT_FILE, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode())
        )
        if not record["replicas_identical"]:
            log.error("replicas diverged: parameter checksums differ across ranks: %s", checksums)

    @staticmethod
    def _write_atomically(path: Path, write) -> None:
        """Readers see the old file or the whole new one, never a torn one."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
