"""Train the shipped speech-deformer checkpoint from scratch, offline, on the CPU.

    python -m distill.train_drive --out deform/weights/speech_deformer.safetensors --replace-shipped

Data the project makes itself: English sentences (`distill.phones.SENTENCES`) spoken by espeak-ng
with varied voices, joined with pauses; the procedural teacher (`distill.teacher`) turns each
clip, force-aligned to its text, into template controls. Bodies are Anny with varied phenotypes
and Gaussians sampled on them, painted like people (skin tones, lips, hair, clothing colours,
`paint`), so the weights are not tied to one identity. (Stage 1 once trained on random colours
and stage 2 on painted bodies: on a real avatar the colour-dependent tokens met colours stage 1
never saw, and its lip motion fell to a twentieth of its shape.)

Two stages, one command:
1. **Supervised** (`--steps`): plain regression on the teacher's targets.
   - template controls: driven-bone rotations and the large facial actions (`TEMPLATE_ACTIONS`),
     each control's error in units of its spread over the data: the jaw moves far less than an
     arm in a beat gesture, yet lip sync hangs on it, so both weigh the same;
   - visemes: soft cross-entropy of the template head's viseme probabilities against the
     teacher's mouth tracks (`deform.controls.viseme_weights`), each viseme weighed by how rare
     it is. A plain regression of the 14 lip actions (an earlier try) learned the /u:/–/i:/
     contrast at a fifth of the teacher's strength: where the audio is ambiguous a regression
     answers the mean, a mouth at rest;
   - particles: the displacement that the student's own lip shape (its visemes' lip actions)
     gives each Gaussian, reproduced by the blended particle transforms plus the Gaussian
     head's Δp, in units of that motion in the window (1 for still particles).
   Audio is augmented every step (gain, noise, spectral tilt) so real microphones generalise.
2. **Distillation** (`--distill-steps`): the paper's render-and-compare objective of
   `avatar finetune` (`distill.finetune`: image L1 + LPIPS, dense keypoints, ARAP) through the
   rasteriser, over all the bodies at once (`SharedObjective`), with the bodies painted with
   skin, lips, mouth and clothing colours so the image terms see the mouth. As in fine-tuning,
   the audio front-end and the template head stay as stage 1 left them; the particle motion
   head, the Gaussian head and the avatar-token encoder learn, and a lip term (`--lambda-lips`)
   keeps them making the lip shape of the deformer's own visemes.

`--audio-encoder DIR` trains on a local wav2vec 2.0 model's features instead of log-mel: the
model stays frozen, its adapter and everything after it learn, and the checkpoint keeps the
adapter (not the wav2vec weights) and the directory (`avatar drive --deformer CKPT`).

`--work DIR` keeps stage 1's result and stage 2's checkpoints: `--resume` then skips a finished
stage 1 and continues stage 2 from its last checkpoint. `--init CKPT` skips stage 1 and distils
an existing checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deform.audio import SAMPLE_RATE, load_audio
from deform.controls import (
    PARTICLE_ACTIONS,
    TEMPLATE_ACTIONS,
    Controls,
    action_index,
    viseme_weights,
)
from deform.deformer import (
    DEFAULT_CHECKPOINT,
    DeformerConfig,
    SpeechDeformer,
    deformer_meta,
    load_deformer,
    save_deformer,
)
from deform.particles import template_particles
from deform.rig import SpeechRig
from deform.templates import load_template
from reconstruct.canonical import PART_CODES, sample_canonical
from render.sh import rgb_to_sh0

from .finetune import FinetuneConfig, FinetuneObjective, SharedObjective
from .losses import loss_lip_motion
from .phones import SENTENCES, align_phones, synthesize_speech
from .scene import DistillScene, SpeechClip, training_cameras
from .teacher import TeacherConfig, teach
from .teachers import ProceduralTeacher
from .trainer import TrainConfig, check_run, load_checkpoint_info
from .trainer import train as train_loop

log = logging.getLogger(__name__)
STAGE1 = "stage1.safetensors"  # in --work: stage 1's result, so --resume skips it
STAGE1_SETTINGS = ("steps", "clips", "bodies", "seed", "gaussians", "gaussian_batch", "batch",
                   "window", "lr", "audio_encoder")  # fmt: skip


@dataclass
class Clip:
    samples: np.ndarray  # 16 kHz
    transcript: str
    bones: torch.Tensor  # [T, B, 3]
    actions: torch.Tensor  # [T, E]


def make_clips(template, num: int, fps: float, seed: int, folder: Path) -> list[Clip]:
    """`num` clips of 1-3 sentences with pauses, and the teacher's controls for each."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in tqdm(range(num), desc="speech data", unit="clip"):
        parts, phones, texts = [], [], []
        t = 0.0
        lead = np.zeros(int(rng.uniform(0.2, 0.8) * SAMPLE_RATE), np.float32)
        parts.append(lead)
        t += len(lead) / SAMPLE_RATE
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(len(SENTENCES)))
            wav = synthesize_speech(
                SENTENCES[k], folder / f"{i}_{k}.wav", seed=int(rng.integers(1 << 30))
            )
            s = load_audio(wav).samples
            for p in align_phones(s, SENTENCES[k]):
                p.start += t
                p.end += t
                phones.append(p)
            gap = np.zeros(int(rng.uniform(0.15, 1.0) * SAMPLE_RATE), np.float32)
            parts += [s, gap]
            texts.append(SENTENCES[k])
            t += (len(s) + len(gap)) / SAMPLE_RATE
        samples = np.concatenate(parts)
        num_frames = int(len(samples) / SAMPLE_RATE * fps)
        c = teach(template, samples, num_frames, phones, TeacherConfig(fps=fps, seed=seed + i))
        clips.append(Clip(samples, " ".join(texts), c.bones, c.actions))
    return clips


def augment(samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gain (-18..+6 dB), spectral tilt and background noise (15-50 dB SNR)."""
    x = samples * 10 ** (rng.uniform(-18, 6) / 20)
    a = rng.uniform(-0.6, 0.6)  # first-order tilt: y = x + a * (x - x[t-1])
    x = x + a * np.diff(x, prepend=x[:1])
    rms = np.sqrt(np.mean(x**2)) + 1e-9
    noise = rng.standard_normal(len(x))
    if rng.uniform() < 0.5:  # pinkish
        noise = np.cumsum(noise) * 0.05
        noise -= np.convolve(noise, np.ones(200) / 200, "same")
    noise *= rms / (np.sqrt(np.mean(noise**2)) + 1e-9) * 10 ** (-rng.uniform(15, 50) / 20)
    return np.clip(x + noise, -1, 1).astype(np.float32)


def make_bodies(template, num: int, gaussians: int, seed: int) -> list[SpeechRig]:
    rigs = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(num):
        shape = (
            template.default_shape()
            if i == 0
            else 0.2 + 0.6 * torch.rand(len(template.shape_names), generator=gen)
        )
        g, b = sample_canonical(template, shape, gaussians, seed=seed + i)
        g = g.replace(sh=(torch.rand(len(g), 1, 3, generator=gen) - 0.5) / 0.2821)
        parts = template_particles(template, shape, PART_CODES, b.face_ids, b.bary, seed=seed + i)
        base = torch.zeros(template.num_bones, 3)
        rig = SpeechRig(
            template, shape, base, g, b.face_ids, b.bary, b.bone_ids, b.bone_weights, parts, b.parts
        )
        rigs.append(rig)
    return rigs


def paint(rig: SpeechRig, rng: np.random.Generator) -> None:
    """Colour a body like a person: a skin tone (light to dark), redder lips, a dark mouth, hair
    (the rest of the head), one clothing colour, and a little per-Gaussian variation."""
    skin = np.array([0.93, 0.76, 0.64]) + rng.uniform() * np.array([-0.57, -0.53, -0.48])
    colours = {"face": skin, "eyelids": skin * 0.92, "lips": skin * [0.8, 0.55, 0.55],
               "mouth": skin * [0.3, 0.12, 0.12], "hand_left": skin, "hand_right": skin}  # fmt: skip
    rgb = torch.as_tensor(rng.uniform(0.1, 0.9, 3), dtype=torch.float32).repeat(len(rig.parts), 1)
    for part, colour in colours.items():
        rgb[rig.parts == PART_CODES[part]] = torch.as_tensor(colour, dtype=torch.float32)
    t = rig.template
    neck = t(rig.shape[None], pose=rig.base_pose[None]).joints[0, t.bone_names.index("head"), 1]
    # (joints and the posed body share a frame; the canonical Gaussians do not)
    hair = (rig.parts == PART_CODES["body"]) & (rig.still().means[:, 1] > neck + 0.03)
    rgb[hair] = torch.as_tensor(
        rng.uniform(0.05, 0.5) * np.array([1.0, 0.8, 0.6]), dtype=torch.float32
    )
    rgb = rgb * (1 + 0.08 * torch.from_numpy(rng.standard_normal((len(rgb), 1))).float())
    g = rig.gaussians
    rig.gaussians = g.replace(sh=torch.cat([rgb_to_sh0(rgb.clamp(0, 1))[:, None], g.sh[:, 1:]], 1))


def distill(model: SpeechDeformer, template, clips: list[Clip], args: argparse.Namespace,
            run: dict, fps: float) -> dict:  # fmt: skip
    """Stage 2: the shared deformer distilled through the renderer over all bodies (sampled
    densely enough for face close-ups, and painted)."""
    rng = np.random.default_rng(args.seed + 1)
    rigs = make_bodies(template, args.bodies, args.distill_gaussians, args.seed + 1)
    for rig in rigs:
        paint(rig, rng)
    speech = [SpeechClip(c.samples, c.transcript, len(c.bones), f"clip{i}")
              for i, c in enumerate(clips)]  # fmt: skip
    teacher = ProceduralTeacher()  # the controls stage 1 learned from, not aligned again
    teacher.controls = [Controls(c.bones, c.actions) for c in clips]
    cfg = FinetuneConfig(lr=args.distill_lr, lr_gaussians=0.0, lambda_lips=args.lambda_lips)
    objectives = [
        FinetuneObjective(
            model, DistillScene(rig, speech, training_cameras(rig, args.size), fps), teacher, cfg
        )  # fmt: skip
        for rig in rigs
    ]
    shared = SharedObjective(model, objectives)
    tcfg = TrainConfig(args.distill_steps, checkpoint_every=50, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        resume = args.resume and load_checkpoint_info(work) is not None  # else stage 2 starts
        result = train_loop(shared, shared.param_groups(), tcfg, work, resume, run=run,
                            desc="distill")  # fmt: skip
        rows = read_metrics(work / "metrics.csv")  # all steps, across resumes
    return {"steps": result.step, "train_seconds": round(total_seconds(rows), 1),
            "loss_first": mean_terms(rows[:20]), "loss_last": mean_terms(rows[-50:])}  # fmt: skip


def read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def total_seconds(rows: list[dict[str, float]]) -> float:
    """Training time over the metrics rows; each resumed process counts from 0 again."""
    total = last = 0.0
    for r in rows:
        if r["seconds"] < last:
            total += last
        last = r["seconds"]
    return total + last


def mean_terms(rows: list[dict]) -> dict[str, float]:
    """Each loss term's mean over the rows (not the step, time or learning rate)."""
    keys = [k for k in (rows[-1] if rows else {}) if k not in ("step", "seconds", "lr")]
    return {k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in keys}


def train(args: argparse.Namespace) -> dict:
    """Both stages; returns the metadata saved with the checkpoint."""
    if args.resume and not args.work:
        raise ValueError("--resume needs --work (the folder the killed run trained in)")
    if Path(args.out).resolve() == DEFAULT_CHECKPOINT.resolve() and not args.replace_shipped:
        raise ValueError(f"--out {args.out} is the shipped checkpoint: add --replace-shipped to "
                         "overwrite it (a release does), or write another file")  # fmt: skip
    if args.audio_encoder and Path(args.out).resolve() == DEFAULT_CHECKPOINT.resolve():
        raise ValueError("--audio-encoder needs --out: the shipped checkpoint is the log-mel one")
    work = Path(args.work) if args.work else None
    settings = {k: getattr(args, k) for k in STAGE1_SETTINGS}
    run = {**settings, "init": file_digest(args.init) if args.init else "",
           "distill_gaussians": args.distill_gaussians, "size": args.size,
           "distill_lr": args.distill_lr, "lambda_lips": args.lambda_lips}  # fmt: skip
    if work is not None and args.resume:  # before stage 1, not after it
        check_run(work, run)
    torch.manual_seed(args.seed)
    template = load_template("anny")
    fps = 25.0
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(template, args.clips, fps, args.seed, Path(tmp))
    if args.init is not None:
        model = load_deformer(args.init, args.audio_encoder or None)
        meta = dict(deformer_meta(args.init).get("training", {}), init=Path(args.init).name)
        meta.pop("distill", None)
    elif work is not None and args.resume and (work / STAGE1).is_file():  # stage 1 had finished
        meta = deformer_meta(work / STAGE1).get("training", {})
        if any(meta.get(k, v) != v for k, v in settings.items()):
            raise ValueError(f"{work / STAGE1}: stage 1 of a different run (other settings); "
                             "use another --work or drop --resume")  # fmt: skip
        model = load_deformer(work / STAGE1)
    else:
        rigs = make_bodies(template, args.bodies, args.gaussians, args.seed)
        paint_rng = np.random.default_rng(args.seed + 2)
        for rig in rigs:  # coloured like people, as in stage 2 and on avatars
            paint(rig, paint_rng)
        model = SpeechDeformer(DeformerConfig(audio_encoder=args.audio_encoder or None))
        meta = supervise(model, template, clips, rigs, args, fps)
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
            save_deformer(model, work / STAGE1, {"training": meta})
    if args.distill_steps > 0:
        meta["distill"] = distill(model, template, clips, args, run, fps)
    save_deformer(model, args.out, {"training": meta})
    return meta


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def supervise(model: SpeechDeformer, template, clips: list[Clip], rigs: list[SpeechRig],
              args: argparse.Namespace, fps: float) -> dict:  # fmt: skip
    """Stage 1: regression on the teacher's template controls and lip displacements."""
    rng = np.random.default_rng(args.seed)
    t_ids = action_index(template, TEMPLATE_ACTIONS)
    p_ids = action_index(template, PARTICLE_ACTIONS)
    # each control's error in units of its spread over the data (see the module docstring)
    bone_std = torch.cat([c.bones for c in clips]).std(0).clamp_min(0.01)
    action_std = torch.cat([c.actions[:, t_ids] for c in clips]).std(0).clamp_min(0.02)
    # visemes: soft cross-entropy, each shape weighed by how rare it is (mean weight 1), so the
    # few frames of /u:/ and /i:/ count as much as the many at rest or open
    freq = viseme_weights(torch.cat([c.actions[:, p_ids] for c in clips])).mean(0)
    viseme_w = (1 / freq.clamp_min(0.01)) / (1 / freq.clamp_min(0.01)).mean()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, args.lr, total_steps=args.steps, pct_start=0.05
    )
    history = []
    bar = tqdm(range(args.steps), desc="train", unit="step")
    t0 = time.perf_counter()
    for _step in bar:
        losses = {"bones": 0.0, "actions": 0.0, "visemes": 0.0, "particles": 0.0, "residual": 0.0}
        for _ in range(args.batch):
            clip = clips[int(rng.integers(len(clips)))]
            rig = rigs[int(rng.integers(len(rigs)))]
            n = min(args.window, len(clip.bones))
            start = int(rng.integers(0, len(clip.bones) - n + 1))
            samples = torch.from_numpy(augment(clip.samples, rng))
            g = rig.gaussians
            tokens = rig.tokens(model)
            state = model.start(tokens)
            state.frame = start
            text = model.transcript_embedding(clip.transcript) if rng.uniform() < 0.5 else None
            sub = rig.moving[torch.randperm(len(rig.moving))[: args.gaussian_batch]]
            motion, _ = model(samples, tokens, state, n, fps, text, gaussian_ids=sub)
            target_bones = clip.bones[start : start + n]
            target_actions = clip.actions[start : start + n]
            err_b = (motion.bones - target_bones) / bone_std
            err_a = (motion.actions - target_actions[:, t_ids]) / action_std
            losses["bones"] = losses["bones"] + err_b.pow(2).mean()
            losses["actions"] = losses["actions"] + err_a.pow(2).mean()
            q = viseme_weights(target_actions[:, p_ids])
            logp = torch.log(motion.visemes.clamp_min(1e-6))
            losses["visemes"] = losses["visemes"] - 2.0 * (viseme_w * q * logp).sum(-1).mean()
            # particles + Δp reproduce the displacement of the lip actions the student's visemes
            # make (canonical space), in units of that motion in the window (1 for still
            # particles), so a pucker's few millimetres weigh as much as a jaw or an arm beat
            losses["particles"] = losses["particles"] + loss_lip_motion(
                rig, g.means, motion, sub, motion.offsets, p_ids
            )
            losses["residual"] = (
                losses["residual"]
                + (motion.log_scales**2).mean()
                + (motion.color**2).mean()
                + (motion.opacity**2).mean() * 0.01
            )
        total = sum(losses.values()) / args.batch
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        row = {k: float(v.detach()) / args.batch for k, v in losses.items()}
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()})
    elapsed = time.perf_counter() - t0
    return {**{k: getattr(args, k) for k in STAGE1_SETTINGS}, "train_seconds": round(elapsed, 1),
            "loss_first": mean_terms(history[:20]), "loss_last": mean_terms(history[-50:])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distill.train_drive", description=__doc__.split("\n")[0]
    )
    p.add_argument("--steps", type=int, default=1500, help="stage 1 steps")
    p.add_argument("--clips", type=int, default=60, help="synthetic speech clips")
    p.add_argument("--bodies", type=int, default=4, help="body shapes")
    p.add_argument("--gaussians", type=int, default=8000, help="Gaussians per body")
    p.add_argument("--gaussian-batch", type=int, default=1024, help="moving Gaussians per window")
    p.add_argument("--batch", type=int, default=3, help="windows per step")
    p.add_argument("--window", type=int, default=32, help="frames per window")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill-steps", type=int, default=300, help="stage 2 steps (0: none)")
    p.add_argument("--distill-lr", type=float, default=3e-4, help="stage 2 learning rate")
    p.add_argument("--size", type=int, default=256, help="stage 2 render size in pixels")
    p.add_argument("--lambda-lips", default=FinetuneConfig.lambda_lips, metavar="W",
                   help="stage 2's lip-shape weight (default: %(default)s)")  # fmt: skip
    p.add_argument("--distill-gaussians", type=int, default=30000, help="per body in stage 2")
    p.add_argument("--work", default="", help="keeps stage 1 and stage 2's checkpoints "
                   "(default: a temporary folder)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue a killed run from --work")
    p.add_argument("--init", type=Path, help="skip stage 1: start stage 2 from this checkpoint")
    p.add_argument("--audio-encoder", default="", metavar="DIR", help="a local wav2vec 2.0 "
                   "model to train on (frozen; its adapter learns) instead of log-mel")  # fmt: skip
    p.add_argument(
        "--out",
        type=Path,
        default=Path("speech_deformer.safetensors"),
        help="the checkpoint to write (default: speech_deformer.safetensors here)",
    )
    p.add_argument(
        "--replace-shipped",
        action="store_true",
        help="allow --out to be the shipped checkpoint (what a release does)",
    )
    args = p.parse_args(argv)
    args.audio_encoder = str(Path(args.audio_encoder).resolve()) if args.audio_encoder else ""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        meta = train(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
