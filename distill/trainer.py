"""The training loop: explicit state, checkpoints, exact resume, metrics log, torchrun DDP.

An objective is an `nn.Module` whose `forward(step, rng, generator)` returns a dict of named,
already weighted loss terms. The trainer owns everything else:

- **State** = the module's state dict + Adam's state + the step. Randomness is not state: every
  step draws from generators seeded by (seed, rank, step), so a run resumed from a checkpoint
  takes exactly the steps an uninterrupted run takes and reaches the same weights.
- **Checkpoints** every `checkpoint_every` steps into the work directory:
  `checkpoint-STEP.safetensors` (tensors) and `checkpoint.json` (step, config, optimiser
  hyper-parameters), each written under a temporary name and renamed; the JSON is written last,
  so a kill at any moment leaves the previous checkpoint valid.
- **Metrics**: `metrics.csv`, one row per step (step, seconds, lr, total, each term); resuming
  truncates rows after the checkpoint so the file matches an uninterrupted run.
- **DDP**: under `torchrun --nproc_per_node=K` (WORLD_SIZE > 1) the module is wrapped in
  `DistributedDataParallel` (NCCL for a module on CUDA, Gloo on the CPU); every rank draws its own windows
  (rank in the seed), gradients are averaged by DDP, and rank 0 alone writes files.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from render.io import atomic_path

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.json"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    checkpoint_every: int = 50
    seed: int = 0
    clip_grad: float = 1.0
    warmup: int = 10
    """Steps of linear learning-rate warm-up (then constant)."""


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, float]]
    seconds: float


def distributed(cuda: bool) -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when launched by torchrun (NCCL for
    a module on CUDA, Gloo for one on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # each rank's CUDA work (a teacher, ...) on its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def step_generators(seed: int, rank: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, rank, step])
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
    return rng, gen


def save_checkpoint(work: Path, step: int, module: nn.Module, opt: torch.optim.Optimizer,
                    cfg: TrainConfig, extra: dict | None = None) -> Path:  # fmt: skip
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    state = opt.state_dict()
    for i, s in state["state"].items():
        for k, v in s.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).contiguous()
    name = f"checkpoint-{step:07d}.safetensors"
    with atomic_path(work / name) as tmp:
        save_file(tensors, str(tmp))
    doc = {"step": step, "tensors": name, "config": asdict(cfg),
           "param_groups": state["param_groups"], **(extra or {})}  # fmt: skip
    with atomic_path(work / CHECKPOINT) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    for old in work.glob("checkpoint-*.safetensors"):  # earlier ones, and any a kill orphaned
        if old.name != name:
            old.unlink(missing_ok=True)
    return work / name


def load_checkpoint_info(work: Path) -> dict | None:
    path = work / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid checkpoint ({exc})") from None


def check_run(work: Path, run: dict | None) -> dict | None:
    """The work directory's checkpoint info (None without one), after checking that `run`
    (what identifies the run: data, config) equals what the checkpoint was saved with."""
    info = load_checkpoint_info(work)
    want = json.loads(json.dumps(run))  # as the checkpoint stored it (tuples become lists)
    if info is not None and want is not None and info.get("run") != want:
        diff = sorted(k for k in want if info.get("run", {}).get(k) != want[k])
        raise ValueError(f"{work}: the checkpoint is from a different run (it differs in "
                         f"{', '.join(diff) or 'its settings'}); use another --work or drop --resume")  # fmt: skip
    return info


def load_checkpoint(work: Path, module: nn.Module, opt: torch.optim.Optimizer,
                    run: dict | None = None) -> int:  # fmt: skip
    """Restore module and optimiser from the work directory; returns the step reached. `run`
    (what identifies the run: data, config) must equal what the checkpoint was saved with."""
    from safetensors.torch import load_file

    info = check_run(work, run)
    if info is None:
        raise ValueError(f"{work}: no checkpoint to resume from")
    tensors = load_file(str(work / info["tensors"]))
    try:
        module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        raise ValueError(f"{work}: the checkpoint does not fit this model ({exc})") from None
    state: dict = {"state": {}, "param_groups": info["param_groups"]}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state["state"].setdefault(int(i), {})[key] = v
    opt.load_state_dict(state)
    return int(info["step"])


class MetricsLog:
    """metrics.csv: a row per step; a column appears when its term first does (a λ ramping up
    from 0), earlier rows left empty there."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path, self.fields = path, []
        rows = []
        if resume_step is not None and path.is_file():
            with path.open() as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if int(r["step"]) <= resume_step]
                self.fields = list(reader.fieldnames or [])
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, float]) -> None:
        if any(k not in self.fields for k in row):
            with self.path.open() as f:
                rows = list(csv.DictReader(f))
            self.fields += [k for k in row if k not in self.fields]
            self._rewrite(rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def train(module: nn.Module, groups: list[dict], cfg: TrainConfig, work: str | Path,
          resume: bool = False, progress: bool = True, run: dict | None = None,
          desc: str = "finetune") -> TrainResult:  # fmt: skip
    """Optimise `module` (Adam over `groups`: dicts of params and lr) for `cfg.steps` steps.
    `run` (JSON-able) is stored with each checkpoint and must match on resume."""
    if cfg.checkpoint_every < 1 or cfg.steps < 1:
        raise ValueError("steps and checkpoint_every must be at least 1")
    work = Path(work)
    cuda = next(module.parameters()).is_cuda
    rank, world = distributed(cuda)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.Adam(groups)
    base_lr = [g["lr"] for g in opt.param_groups]
    step = load_checkpoint(work, module, opt, run) if resume else 0
    if step > cfg.steps:
        raise ValueError(
            f"{work}: the checkpoint is at step {step}, past the {cfg.steps} steps asked for"
        )
    model = module
    if world > 1:
        dev = [torch.cuda.current_device()] if cuda else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=dev,
                                                    find_unused_parameters=True)  # fmt: skip
    metrics = MetricsLog(work / "metrics.csv", step if resume else None) if rank == 0 else None
    params = [p for g in opt.param_groups for p in g["params"]]
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step",
               disable=not progress or rank != 0)  # fmt: skip
    with bar:
        while step < cfg.steps:
            scale = min(1.0, (step + 1) / max(cfg.warmup, 1))
            for g, lr in zip(opt.param_groups, base_lr, strict=True):
                g["lr"] = lr * scale
            rng, gen = step_generators(cfg.seed, rank, step)
            terms = model(step, rng, gen)
            if not terms:
                raise ValueError(f"no loss term is active at step {step} (all λ are 0 there)")
            total = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            step += 1
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 3),
                   "lr": base_lr[0] * scale, "total": float(total.detach()),
                   **{k: float(v.detach()) for k, v in terms.items()}}  # fmt: skip
            history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in terms or k == "total"})
            bar.update(1)
            if metrics is not None:
                metrics.write(row)
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                save_checkpoint(work, step, module, opt, cfg, {"run": run})
    return TrainResult(step, history, time.perf_counter() - t0)
