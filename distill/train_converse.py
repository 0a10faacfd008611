"""Train the shipped conversational motion model from scratch, offline, on the CPU.

    python -m distill.train_converse --out deform/weights/converse.safetensors --replace-shipped

Data the project makes itself: two-person conversations spoken by espeak-ng
(`distill.listen_teacher.dialogue`: turns, overlaps, pauses, backchannels), each seen from both
sides; the tracks' speech probabilities (Silero VAD, `deform.voice`) and the listening teacher's
motion (`distill.listen_teacher.conversation_pair`: each side's listener also mirrors the other's
posture and follows its glances, and each example keeps the other side's motion for the
partner tokens; `--no-partner-motion` trains the one-stream model of earlier releases). Conversations use the first 48 of
`distill.phones.SENTENCES`; the held-out ones (`--evaluate`) the other 12, in other voices.

`--data DIR` trains on the user's own conversation videos instead, turned into the same format
by `python -m distill.extract_motion` (nods found in the extracted head pitch).

Two stages, one command (UniLS):
1. **Audio-free prior** (`--steps1`): the model's own motion history and role only (no partner
   audio, the gate shut), teacher-forced with noise on the history.
2. **Both tracks** (`--steps2`): the partner's audio (and motion, in 70% of the windows; the
   rest as one avatar alone sees it) through the delayed cross-attention and the gate,
   everything fine-tuned.

`--evaluate N` then generates motion for N test conversations (held-out sentences, other voices
and seeds than the validation ones the sampling temperature was chosen on) and prints, as JSON, the full
model against the stage-1-only and the audio-only (no motion history, trained on stage 2
alone) ablations: FD and SID of listening motion against the teacher's, reaction delays, head
speed while listening over speaking, jaw while listening over speaking, how different two
seeds' listening motion is, and mirroring and gaze following with the two sides stepped
together (`ConverseModel.step_pair`) and apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deform.conversation import (
    DEFAULT_CHECKPOINT,
    FEATURES,
    NUM_COARSE,
    TEMPERATURE,
    ConverseConfig,
    ConverseModel,
    save_converse,
)
from deform.voice import speech_probability

from . import converse_measures as cm
from .listen_teacher import conversation_pair, dialogue
from .phones import SENTENCES

log = logging.getLogger(__name__)
TRAIN_SENTENCES, HELD_OUT_SENTENCES = SENTENCES[:48], SENTENCES[48:]
HELD_OUT_SEED = 100_000  # validation conversations (the sampling temperature was chosen on them)
TEST_SEED = 200_000  # test conversations (--evaluate): nothing is chosen on them
NO_PARTNER_MOTION = 0.3  # share of training windows without the partner's motion (one avatar)


@dataclass
class Example:
    own: np.ndarray  # 16 kHz
    partner: np.ndarray
    own_prob: np.ndarray  # [T]
    partner_prob: np.ndarray  # [T]
    x: np.ndarray  # [T, F] the teacher's motion
    nods: np.ndarray  # [T, F] its nods
    events: list[tuple[float, float]]  # the nods' onsets (s) and amplitudes
    partner_x: np.ndarray | None = None  # [T, F] the partner's motion (None: not known)


def examples(seeds, sentences, fps: float, partner_motion: bool = True) -> list[Example]:
    """Both sides of each conversation; with `partner_motion`, each side also takes up what it
    sees of the other (`listen_teacher.mirrored`) and keeps the other's motion."""
    out = []
    for seed in tqdm(list(seeds), desc="conversations", unit="conv"):
        a, b = dialogue(seed, sentences)
        num = int(len(a) / 16000 * fps)
        pa, pb = speech_probability(a, num, fps), speech_probability(b, num, fps)
        one, two = conversation_pair(a, b, pa, pb, fps, (2 * seed, 2 * seed + 1), partner_motion)
        seen = (two.x, one.x) if partner_motion else (None, None)
        out.append(Example(a, b, pa, pb, one.x, one.nods, one.events, seen[0]))
        out.append(Example(b, a, pb, pa, two.x, two.nods, two.events, seen[1]))
    return out


def _crop(v: np.ndarray, start: int, length: int) -> torch.Tensor:
    """Frames start..start+length−1 of `v`, zeros past its end."""
    return torch.from_numpy(
        np.pad(v, [(0, length)] + [(0, 0)] * (v.ndim - 1))[start : start + length]
    )


def real_examples(folder: str | Path, fps: float) -> list[Example]:
    """Clips of `python -m distill.extract_motion`, their nods found as `nod_onsets` finds
    them (amplitude: the head's pitch rise over the next 0.2 s)."""
    from deform.conversation import nod_curve, nod_vector

    from .extract_motion import FPS, load_clips

    if abs(fps - FPS) > 1e-6:
        raise ValueError(f"extracted clips are at {FPS:g} fps; train with --fps {FPS:g}")
    out = []
    for clip in load_clips(folder):
        x = clip["x"]
        t = np.arange(len(x)) / fps
        events = []
        for i in cm.nod_onsets(x, fps):
            rise = float(x[i : i + int(0.2 * fps) + 1, 0].max() - x[i, 0])
            events.append((i / fps, rise))
        lift = sum((a * nod_curve(t - o) for o, a in events), np.zeros(len(x)))
        nods = (lift[:, None] * nod_vector().numpy()[None]).astype(np.float32)
        out.append(Example(clip["own"], clip["partner"], clip["own_prob"], clip["partner_prob"],
                           x, nods, events))  # fmt: skip
    return out


def batch(model: ConverseModel, data: list[Example], rng: np.random.Generator, size: int,
          length: int):  # fmt: skip
    w = model.cfg.window
    xs, nods, owns, toks, onsets, amps = [], [], [], [], [], []
    fps = model.cfg.fps
    for _ in range(size):
        ex = data[int(rng.integers(len(data)))]
        start = int(rng.integers(0, max(1, len(ex.x) - length)))
        stop = start + length
        prob = np.pad(ex.partner_prob, (w, length))[start + 1 : stop + w]  # frames start-w+1..
        motion = None  # the partner's motion of frames j − 1, unknown in a share of the batch
        if ex.partner_x is not None and rng.uniform() >= NO_PARTNER_MOTION:
            seen = np.pad(ex.partner_x, [(w + 1, length), (0, 0)])[start + 1 : stop + w]
            motion = (torch.from_numpy(seen) - model.mean) / model.std
        toks.append(model.partner_tokens(ex.partner, torch.from_numpy(prob), start - w + 1, stop,
                                         motion))  # fmt: skip
        xs.append(_crop(ex.x, start, length))
        nods.append(_crop(ex.nods, start, length))
        owns.append(_crop(ex.own_prob, start, length))
        onset, amp = torch.zeros(length), torch.zeros(length)
        for t, a in ex.events:
            if start <= round(t * fps) < stop:
                onset[round(t * fps) - start], amp[round(t * fps) - start] = 1.0, a
        onsets.append(onset)
        amps.append(amp)
    x = (torch.stack(xs) - model.mean) / model.std
    smooth = (x - torch.stack(nods) / model.std)[..., :NUM_COARSE]
    return (x, torch.stack(owns).float(), torch.stack(toks), smooth, torch.stack(onsets),
            torch.stack(amps))  # fmt: skip


def fit(model: ConverseModel, data: list[Example], steps: int, lr: float, seed: int,
        desc: str, size: int = 12, length: int = 250) -> list[dict]:  # fmt: skip
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    history = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        losses = model.loss(*batch(model, data, rng, size, length), history_noise=0.1)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        row = {k: float(v) for k, v in losses.items()}
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()})
    return history


def mean_rows(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]} if rows else {}


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.data:
        data = real_examples(args.data, args.fps)
    else:
        data = examples(range(args.seed * 1000, args.seed * 1000 + args.conversations),
                        TRAIN_SENTENCES, args.fps, args.partner_motion)  # fmt: skip
    stack = np.concatenate([e.x for e in data])
    cfg = ConverseConfig(fps=args.fps, partner_motion=args.partner_motion)
    model = ConverseModel(cfg)
    model.mean.copy_(torch.from_numpy(stack.mean(0)))
    model.std.copy_(torch.from_numpy(stack.std(0)).clamp_min(0.01))
    model.audio_on = False
    h1 = fit(model, data, args.steps1, args.lr, args.seed, "stage 1 (motion prior)")
    stage1 = {k: v.clone() for k, v in model.state_dict().items()}
    model.audio_on = True
    h2 = fit(model, data, args.steps2, args.lr / 2, args.seed + 1, "stage 2 (both tracks)")
    meta = {"training": {"data": str(args.data) if args.data else "listening teacher",
                         "conversations": len(data) if args.data else args.conversations,
                         "steps1": args.steps1,
                         "steps2": args.steps2, "seed": args.seed, "fps": args.fps,
                         "train_seconds": round(time.perf_counter() - t0, 1),
                         "stage1_loss_last": mean_rows(h1[-50:]),
                         "stage2_loss_last": mean_rows(h2[-50:])}}  # fmt: skip
    if args.out.resolve() == DEFAULT_CHECKPOINT.resolve() and not args.replace_shipped:
        raise ValueError(f"--out {args.out} is the shipped checkpoint: add --replace-shipped")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_converse(model.eval(), args.out, meta)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        ablation = ConverseModel(replace(cfg, partner_audio=False))
        ablation.load_state_dict(stage1)
        save_converse(ablation.eval(), work / "stage1_only.safetensors", meta)
        if args.ablations:
            audio_only = ConverseModel(replace(cfg, history=False))
            audio_only.mean.copy_(model.mean)
            audio_only.std.copy_(model.std)
            fit(audio_only, data, args.steps2, args.lr, args.seed + 2, "ablation (audio only)")
            save_converse(audio_only.eval(), work / "audio_only.safetensors", meta)
    return meta


# ---- evaluation on held-out conversations ----------------------------------------------------------
def generate(
    model: ConverseModel, ex: Example, seed: int, chunk: int = 25, temperature: float = TEMPERATURE
) -> np.ndarray:
    state, rows = model.start(seed), []
    own, pp = torch.from_numpy(ex.own_prob), torch.from_numpy(ex.partner_prob)
    for s in range(0, len(ex.x), chunk):
        out, state = model.step(
            state, own[s : s + chunk], ex.partner, pp[s : s + chunk], temperature
        )
        rows.append(out.numpy())
    return np.concatenate(rows)


def generate_pair(model: ConverseModel, a: Example, b: Example, seed: int, chunk: int = 25,
                  temperature: float = TEMPERATURE) -> list[np.ndarray]:  # fmt: skip
    """Both sides of one conversation stepped together (`ConverseModel.step_pair`): each sees
    the other's motion."""
    states = [model.start(seed), model.start(seed + 1)]
    owns = [torch.from_numpy(a.own_prob), torch.from_numpy(b.own_prob)]
    rows: list[list[np.ndarray]] = [[], []]
    for s in range(0, len(a.x), chunk):
        outs, states = model.step_pair(states, [o[s : s + chunk] for o in owns], [a.own, b.own],
                                       temperature)  # fmt: skip
        for k in range(2):
            rows[k].append(outs[k].numpy())
    return [np.concatenate(r) for r in rows]


def mirror_figures(motions: list[np.ndarray], data: list[Example], fps: float) -> dict:
    """`converse_measures.mirroring` of each side against the other side of its conversation
    (examples come in pairs, the two sides of one conversation): posture and gaze."""
    out = {}
    for name, features in (("mirroring", cm.MIRRORED), ("gaze_following", cm.FOLLOWED)):
        rows = [cm.mirroring(motions[i], motions[i ^ 1], e.own_prob, e.partner_prob, fps,
                             features) for i, e in enumerate(data)]  # fmt: skip
        out[f"{name}_peak"] = float(np.mean([r["peak"] for r in rows]))
        out[f"{name}_lag_s"] = float(np.median([r["lag_s"] for r in rows]))
    return out


def evaluate(models: dict[str, ConverseModel], data: list[Example], fps: float) -> dict:
    ref = [cm.motion_frames(e.x, cm.roles(e.own_prob, e.partner_prob)[1], fps) for e in data]
    keep = np.concatenate(ref).std(0) > 1e-6  # features the teacher moves while listening
    ref_all = np.concatenate(ref)[:, keep]
    scale = ref_all.std(0)  # every feature in units of its spread
    centres = cm.kmeans(ref_all / scale, 40)
    result = {"teacher": {"sid_bits": cm.sid(ref_all / scale, centres),
                          **clip_figures([e.x for e in data], data, fps),
                          **mirror_figures([e.x for e in data], data, fps)}}  # fmt: skip
    for name, model in models.items():
        gen = [generate(model, e, seed=1) for e in data]
        again = [generate(model, e, seed=2) for e in data]
        frames = np.concatenate([cm.motion_frames(g, cm.roles(e.own_prob, e.partner_prob)[1], fps)
                                 for g, e in zip(gen, data, strict=True)])[:, keep]  # fmt: skip
        differ = np.mean([np.abs(a - b)[cm.roles(e.own_prob, e.partner_prob)[1]].mean()
                          for a, b, e in zip(gen, again, data, strict=True)])  # fmt: skip
        result[name] = {"fd": cm.frechet(frames / scale, ref_all / scale),
                        "sid_bits": cm.sid(frames / scale, centres),
                        "seed_difference": float(differ), **clip_figures(gen, data, fps),
                        # each side apart, with the seeds the pair below uses (1, 2)
                        "apart": mirror_figures([(gen, again)[i % 2][i] for i in range(len(data))],
                                                data, fps)}  # fmt: skip
        if model.cfg.partner_motion:  # two avatars that see each other
            pairs = [generate_pair(model, data[i], data[i + 1], seed=1)
                     for i in range(0, len(data) - 1, 2)]  # fmt: skip
            result[name]["together"] = mirror_figures([x for p in pairs for x in p], data, fps)
    return result


def clip_figures(motions: list[np.ndarray], data: list[Example], fps: float) -> dict:
    rows = [
        cm.summary(x, e.own_prob, e.partner_prob, fps) for x, e in zip(motions, data, strict=True)
    ]
    delays = [d for r in rows for d in r["reaction_delays_s"]]
    nodded = [tuple(map(int, r["nodded_phrase_ends"].split("/"))) for r in rows]
    keys = ("jaw_listening_over_speaking", "head_speed_ratio", "longest_still_listening_s")
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    out["longest_still_listening_s"] = float(max(r["longest_still_listening_s"] for r in rows))
    out["reaction_delay_s"] = ({"median": float(np.median(delays)),
                                "p10": float(np.percentile(delays, 10)),
                                "p90": float(np.percentile(delays, 90)), "count": len(delays)}
                               if delays else None)  # fmt: skip
    out["nodded_phrase_ends"] = f"{sum(a for a, _ in nodded)}/{sum(b for _, b in nodded)}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.train_converse",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--conversations", type=int, default=40, help="synthetic conversations")
    p.add_argument("--data", type=Path, help="train on real clips instead: a folder written by "
                   "python -m distill.extract_motion")  # fmt: skip
    p.add_argument("--steps1", type=int, default=500, help="stage 1 steps (motion prior)")
    p.add_argument("--steps2", type=int, default=500, help="stage 2 steps (both tracks)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work", default="", help="keep the stage-1-only (and ablation) checkpoints here"
    )
    p.add_argument("--ablations", action="store_true", help="also train the audio-only ablation "
                   "into --work")  # fmt: skip
    p.add_argument("--evaluate", type=int, default=0, metavar="N", help="then measure on N "
                   "held-out conversations (with --work: against the ablations)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("converse.safetensors"),
                   help="the checkpoint to write (default: converse.safetensors here)")  # fmt: skip
    p.add_argument("--replace-shipped", action="store_true",
                   help="allow --out to be the shipped checkpoint (what a release does)")  # fmt: skip
    p.add_argument("--skip-training", action="store_true", help="only --evaluate --out")
    p.add_argument("--partner-motion", action=argparse.BooleanOptionalAction, default=True,
                   help="the two-stream model: the partner's motion in the attended tokens, and "
                   "a teacher whose listener mirrors the speaker's posture and follows its "
                   "glances (--no-partner-motion: the one-stream model of earlier releases)")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        meta = {} if args.skip_training else train(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.evaluate:
        from deform.conversation import load_converse

        models = {"full": load_converse(args.out)}
        for name in ("stage1_only", "audio_only"):
            path = Path(args.work) / f"{name}.safetensors" if args.work else None
            if path and path.is_file():
                models[name] = load_converse(path)
        held = examples(range(TEST_SEED, TEST_SEED + args.evaluate), HELD_OUT_SENTENCES,
                        args.fps, args.partner_motion)  # fmt: skip
        meta["held_out"] = evaluate(models, held, args.fps)
        meta["held_out"]["features"] = list(FEATURES)
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
