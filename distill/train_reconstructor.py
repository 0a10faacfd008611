"""Train and evaluate the reconstructor (`reconstruct.network`) on data the project makes offline.

    python -m distill.train_reconstructor train --data recon_data --steps 1000 \\
        --out reconstruct/weights/reconstructor.safetensors    # makes recon_data first if needed
    python -m distill.train_reconstructor data --out recon_held --count 24 --seed 100000
    python -m distill.train_reconstructor eval --data recon_held \\
        --model reconstruct/weights/reconstructor.safetensors --model no_hands.safetensors

Data: synthetic subjects (`reconstruct.synthetic`): Anny bodies with varied phenotypes, poses,
procedural skin, hair, clothes and gloves, their ground-truth canonical Gaussians rendered as the
front photo. Each sample is one safetensors file (the format is in the README, "The feed-forward
reconstructor"); real data in the same format trains the same way.

Loss per subject, summed over a batch:
- `rgb`: L1 between predicted and ground-truth colours, per Gaussian (the template sampler gives
  both the same points, so they correspond one to one);
- `offset`: L1 between predicted and true positions, in centimetres;
- `render`: L1 between renders of the prediction and of the truth, posed, at `render_size`, from
  the photo's camera and from one random yaw around the person.

The trainer is `distill.trainer.train`: checkpoints, exact `--resume`, `metrics.csv`, and
`torchrun --nproc_per_node=K -m distill.train_reconstructor train ...` for DDP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from deform.skinning import apply_blend
from reconstruct.feedforward import fit_silhouette, prepare_inputs
from reconstruct.losses import masked_quality
from reconstruct.network import (
    Reconstructor,
    ReconstructorConfig,
    load_reconstructor,
    part_groups,
)
from reconstruct.refine import RefineConfig, posed_blend, refine_appearance
from reconstruct.synthetic import TEMPLATE, Subject, load_subject, make_dataset
from render import Cameras, Gaussians, fit_to_points, rasterize
from render.sh import rgb_to_sh0, sh0_to_rgb

from .trainer import TrainConfig, train

log = logging.getLogger(__name__)
NOVEL_YAWS = (90.0, 180.0, 270.0)


@dataclass(frozen=True)
class ReconTrainConfig:
    batch: int = 2
    """Subjects per step."""
    lr: float = 5e-4
    render_size: int = 128
    lambda_rgb: float = 1.0
    lambda_offset: float = 0.1
    lambda_render: float = 1.0
    jitter: float = 0.08
    """Random shift and scale of the head and hand boxes, fraction of their side."""
    camera_jitter: float = 0.015
    """Random focal scale and shift of the camera the network's inputs are prepared with (a
    template fit is never exact), fraction of the image."""


def sample_files(data: str | Path) -> list[Path]:
    data = Path(data)
    index = data / "index.json"
    if not index.is_file():
        raise ValueError(f"{data}: not a reconstructor dataset (no index.json)")
    files = [data / f for f in json.loads(index.read_text())["files"]]
    if not files:
        raise ValueError(f"{data}: the dataset is empty")
    return files


def posed(g: Gaussians, s: Subject) -> Gaussians:
    return apply_blend(g, posed_blend(s.binding, s.transforms))


def view_cameras(truth: Gaussians, yaws: tuple[float, ...], size: int) -> Cameras:
    """Cameras around the posed person `truth` (yaw 0 = the photo's side), `size` px square."""
    return fit_to_points(truth.means, size, size, torch.tensor(yaws), fov_y_deg=30.0, fill=0.9)


def jitter_camera(cam: Cameras, rng: np.random.Generator, amount: float) -> Cameras:
    """The camera with its focal length scaled and its principal point shifted at random."""
    if amount <= 0:
        return cam
    k = cam.Ks.clone()
    k[:, :2, :2] *= 1 + rng.uniform(-amount, amount)
    k[:, 0, 2] += rng.uniform(-amount, amount) * cam.width
    k[:, 1, 2] += rng.uniform(-amount, amount) * cam.height
    return Cameras(cam.viewmats, k, cam.width, cam.height)


class ReconObjective(nn.Module):
    """forward(step, rng, gen) -> weighted loss terms, for `distill.trainer.train`."""

    def __init__(self, model: Reconstructor, files: list[Path], cfg: ReconTrainConfig) -> None:
        super().__init__()
        self.model, self.files, self.cfg = model, files, cfg
        self._cache: dict[int, Subject] = {}

    def subject(self, i: int) -> Subject:
        if i not in self._cache:
            self._cache[i] = load_subject(self.files[i])
        return self._cache[i]

    def forward(
        self, step: int, rng: np.random.Generator, gen: torch.Generator
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        terms: dict[str, Tensor] = {}
        for _ in range(cfg.batch):
            s = self.subject(int(rng.integers(len(self.files))))
            cam = jitter_camera(s.camera, rng, cfg.camera_jitter)
            inp = prepare_inputs(s.template, s.binding, s.transforms, cam, s.image, s.mask,
                                 self.model.cfg, seed=int(rng.integers(1 << 31)), jitter=cfg.jitter)  # fmt: skip
            pred = self.model(inp)
            parts: dict[str, Tensor] = {}
            if s.target is not None:  # ground-truth Gaussians (synthetic data)
                true_rgb = sh0_to_rgb(s.target.sh[:, 0])
                parts["rgb"] = cfg.lambda_rgb * (sh0_to_rgb(pred.sh[:, 0]) - true_rgb).abs().mean()
                parts["offset"] = (
                    cfg.lambda_offset * 100 * (pred.means - s.target.means).abs().mean()
                )
                if cfg.lambda_render > 0:
                    yaw = float(rng.uniform(60, 300))
                    with torch.no_grad():
                        truth = posed(s.target, s)
                    pred_posed = posed(pred, s)
                    loss = 0.0
                    for cam in (s.camera.resized(cfg.render_size),
                                view_cameras(truth, (yaw,), cfg.render_size)):  # fmt: skip
                        with torch.no_grad():
                            want = rasterize(truth, cam, background=1.0).rgb
                        got = rasterize(pred_posed, cam, background=1.0).rgb
                        loss = loss + (got - want).abs().mean() / 2
                    parts["render"] = cfg.lambda_render * loss
            if s.views is not None and cfg.lambda_render > 0:  # photos from other cameras
                v = int(rng.integers(len(s.views.cameras)))
                got = rasterize(posed(pred, s), s.views.cameras[v], background=1.0).rgb[0]
                loss = (got - s.views.rgb[v]).abs().mean()
                parts["render"] = parts.get("render", 0.0) + cfg.lambda_render * loss
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + v / cfg.batch
        return terms


def run_training(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    if not data.exists() or (data / ".making").exists():  # one command from nothing
        if "RANK" in os.environ:  # under torchrun every rank would make it at once
            raise ValueError(f"{data}: make the data first (python -m distill.train_reconstructor "
                             f"data --out {data}), then start torchrun")  # fmt: skip
        log.info("making %d synthetic subjects in %s", args.count, data)
        data.mkdir(parents=True, exist_ok=True)
        (data / ".making").touch()  # an interrupted run finishes the data next time
        make_dataset(data, args.count, seed=0)
        (data / ".making").unlink()
    files = sample_files(data)
    net_cfg = ReconstructorConfig(hand_branch=not args.no_hand_branch, queries=args.queries,
                                  encoder_path=args.encoder)  # fmt: skip
    cfg = ReconTrainConfig(batch=args.batch, lr=args.lr)
    torch.manual_seed(args.seed)
    model = Reconstructor(net_cfg)
    objective = ReconObjective(model, files, cfg)
    work = Path(args.work or Path(args.out).with_suffix(".train"))
    run = {"data": str(Path(args.data).resolve()), "net": asdict(net_cfg), "train": asdict(cfg)}
    tcfg = TrainConfig(steps=args.steps, checkpoint_every=args.checkpoint_every, seed=args.seed,
                       warmup=50)  # fmt: skip
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    result = train(objective, groups, tcfg, work, args.resume, True, run, desc="reconstructor")
    last = result.history[-20:] or [{}]
    info = {
        "trained_with": "python -m distill.train_reconstructor train " + " ".join(args.argv),
        "subjects": len(files),
        "steps": result.step,
        "seconds": round(result.seconds, 1),
        "final_terms": {
            k: round(float(np.mean([r[k] for r in last])), 5)
            for k in last[0]
            if k not in ("step", "seconds", "lr")
        },  # fmt: skip
    }
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        model.save(args.out, info)
    return info


# ---- evaluation --------------------------------------------------------------------------------
def _view_psnr(pred: Gaussians, s: Subject, cams: list[Cameras], hands: bool = False) -> float:
    """PSNR of renders against the truth over the person (either alpha > 0.5), pooled over the
    views; with `hands`, only inside the boxes around the two hands in each view."""
    from reconstruct.canonical import PART_CODES

    err, count = 0.0, 0.0
    with torch.no_grad():
        truth, ours = posed(s.target, s), posed(pred, s)
    for cam in cams:
        with torch.no_grad():
            want = rasterize(truth, cam, background=1.0)
            got = rasterize(ours, cam, background=1.0)
        mask = ((want.alpha > 0.5) | (got.alpha > 0.5)).float()
        if hands:
            inside = torch.zeros_like(mask)
            uv = cam.project(truth.means)[0]
            for part in ("hand_left", "hand_right"):
                sel = uv[s.binding.parts == PART_CODES[part]]
                x0, y0 = sel.min(0).values.floor().clamp(min=0).int().tolist()
                x1, y1 = (sel.max(0).values.ceil().int() + 1).tolist()
                inside[:, y0:y1, x0:x1] = 1
            mask = mask * inside
        err += float((((got.rgb - want.rgb) ** 2) * mask).sum())
        count += float(mask.sum()) * 3
    return -10 * float(np.log10(max(err / max(count, 1.0), 1e-12)))


def _photo_colours(g: Gaussians, s: Subject) -> Gaussians:
    """`g` with the colour prior create's refinement starts from (no network)."""
    from deform.templates import load_template
    from reconstruct.complete import colour_prior

    face = s.binding.parts == 1
    face_uv = s.camera.project(posed(g, s).means[face])[0].numpy()
    rgb = colour_prior(g, s.binding, load_template(TEMPLATE), s.transforms, s.camera, s.image,
                       s.mask, {"face": face_uv})  # fmt: skip
    return g.replace(sh=rgb_to_sh0(rgb)[:, None])


def evaluate(models: dict[str, Reconstructor], files: list[Path], refine_subjects: int = 4,
             refine_steps: int = 150, size: int = 256) -> dict:  # fmt: skip
    """Feed-forward quality of each model against three starts without it, on held-out subjects:
    `template` (grey template Gaussians), `template+photo` (the colour prior `avatar create`
    starts its refinement from without the network) and `silhouette+photo` (the network's
    closed-form silhouette step with that colour prior: what the network adds beyond it). Then
    create's refinement from each start but the grey one, with the steps each needs to reach
    `template+photo`'s final input-view PSNR."""
    rows: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, list[list[float]]] = {}
    times: dict[str, list[float]] = {}
    rcfg = RefineConfig(steps=refine_steps)
    for i, path in enumerate(tqdm(files, desc="evaluate", unit="subject")):
        s = load_subject(path)
        if s.target is None:
            raise ValueError(f"{path}: evaluation needs ground-truth Gaussians (target.*)")
        with torch.no_grad():
            truth = posed(s.target, s)
        novel = [view_cameras(truth, (yaw,), size) for yaw in NOVEL_YAWS]
        every = [s.camera.resized(size), *novel]
        fitted = fit_silhouette(s.template, part_groups(s.binding.parts),
                                posed_blend(s.binding, s.transforms), s.camera, s.mask)  # fmt: skip
        starts = {"template": s.template, "template+photo": _photo_colours(s.template, s),
                  "silhouette+photo": _photo_colours(fitted, s)}  # fmt: skip
        for name, model in models.items():
            t0 = time.perf_counter()
            inp = prepare_inputs(s.template, s.binding, s.transforms, s.camera, s.image, s.mask,
                                 model.cfg)  # fmt: skip
            with torch.no_grad():
                starts[name] = model(inp)
            times.setdefault(name, []).append(time.perf_counter() - t0)
        for name, g in starts.items():
            with torch.no_grad():
                out = rasterize(posed(g, s), s.camera, background=1.0)
            r = rows.setdefault(name, {})
            r.setdefault("input_masked_psnr", []).append(
                masked_quality(out.rgb, s.image[None], s.mask[None, ..., None])[0]
            )
            r.setdefault("novel_psnr", []).append(_view_psnr(g, s, novel))
            r.setdefault("hand_psnr", []).append(_view_psnr(g, s, every, hands=True))
            if i < refine_subjects and name != "template":
                trace: list[float] = []
                refine_appearance(g, s.binding, s.transforms, s.camera, s.image, s.mask, rcfg,
                                  progress=False, trace=trace)  # fmt: skip
                curves.setdefault(name, []).append(trace)
    summary = {
        name: {k: round(float(np.mean(v)), 2) for k, v in r.items()} for name, r in rows.items()
    }
    for name, t in times.items():
        summary[name]["forward_s"] = round(float(np.mean(t)), 3)
    if "template+photo" in curves:
        base = np.mean(curves["template+photo"], 0)
        goal = float(base[-1])
        for name, cs in curves.items():
            mean = np.mean(cs, 0)
            reached = np.nonzero(mean >= goal - 1e-6)[0]
            at = sorted({0, min(49, len(mean) - 1), len(mean) - 1})
            summary[name]["refine_psnr_at_steps"] = {j + 1: round(float(mean[j]), 2) for j in at}
            summary[name]["refine_steps_to_baseline_final"] = (
                int(reached[0]) + 1 if len(reached) else None
            )
        summary["refine_goal_psnr"] = round(goal, 2)
    summary["subjects"] = len(files)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    p = argparse.ArgumentParser(prog="python -m distill.train_reconstructor",
                                description=__doc__.split("\n")[0])  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="make synthetic subjects")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--count", type=int, default=400)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--gaussians", type=int, default=8192)
    d.add_argument("--size", type=int, default=256)
    t = sub.add_parser("train", help="train a reconstructor")
    t.add_argument("--data", type=Path, required=True,
                   help="a dataset folder; made from --count synthetic subjects if it does not exist")  # fmt: skip
    t.add_argument("--count", type=int, default=400, help="subjects to make for a new --data")
    t.add_argument("--out", type=Path, required=True, help="OUT.safetensors (+ OUT.json)")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch", type=int, default=2)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--queries", type=int, default=1024)
    t.add_argument("--no-hand-branch", action="store_true", help="ablation: no Hand++ branch")
    t.add_argument("--encoder", help="local transformers ViT/DINOv2 folder for body and head")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--work", type=Path, help="checkpoints folder (default: OUT.train)")
    t.add_argument("--resume", action="store_true")
    e = sub.add_parser("eval", help="held-out quality, with and without each model")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--model", action="append", default=[], help="a checkpoint (repeatable)")
    e.add_argument("--refine-subjects", type=int, default=4)
    e.add_argument("--refine-steps", type=int, default=150)
    args = p.parse_args(argv)
    args.argv = argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "data":
            make_dataset(args.out, args.count, args.seed, args.gaussians, args.size)
            return 0
        if args.cmd == "train":
            print(json.dumps(run_training(args), indent=1))
            return 0
        models = {Path(m).stem: load_reconstructor(m) for m in args.model}
        starts = {"template", "template+photo", "silhouette+photo"}
        if len(models) != len(args.model) or starts & set(models):
            raise ValueError(f"--model checkpoints need distinct names, none of {sorted(starts)}")
        print(json.dumps(evaluate(models, sample_files(args.data), args.refine_subjects,
                                  args.refine_steps), indent=1))  # fmt: skip
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
