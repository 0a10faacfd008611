"""Per-identity distillation: the avatar driven by audio, rendered, compared with a teacher, and
the deformer, its Gaussian head and the canonical Gaussians updated end to end through the
renderer (paper section 3.3).

    L = λ_vsd L_vsd + λ_kpt L_kpt + λ_img L_img + λ_reg L_arap + λ_lips L_lips

One step: a window of `frames` video frames of a speech clip and a camera are drawn; the
deformer runs over the window's audio; the rig poses the avatar (blendshapes, particles,
residuals, skinning) and `render.rasterize` draws each frame; the teacher gives its frames and
keypoints for the same window; the weighted terms come back to `distill.trainer.train`.

L_lips keeps what the image terms cannot see well and ARAP pulls toward rest: the lip shape
(pucker, spread, press) that the deformer's own visemes ask for, made by the particles and Δp
(`distill.losses.loss_lip_motion`, stage 1's particle term). Without it distillation flattened
the lips: /u:/ over /i:/ mouth width 0.82 after stage 1, 0.87 after stage 2 on the demo avatar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from deform.controls import PARTICLE_ACTIONS, action_index
from deform.deformer import SpeechDeformer
from render import Gaussians

from .losses import ArapGraph, Weight, loss_arap, loss_image, loss_keypoints, loss_lip_motion
from .scene import DistillScene, Window
from .teachers import Teacher


@dataclass(frozen=True)
class FinetuneConfig:
    frames: int = 8
    """Video frames per training window."""
    warmup_frames: int = 25
    """Frames before each window that warm the deformer's state up (no gradients)."""
    lambda_vsd: str = "1"
    """Video score distillation (needs a teacher with a score model)."""
    lambda_kpt: str = "0.05"
    """Dense keypoint alignment (pixels, Charbonnier)."""
    lambda_img: str = "1"
    """L1 + λ_perc LPIPS."""
    lambda_reg: str = "1e4"
    """ARAP on particles and Gaussians (metres²)."""
    lambda_lips: str = "0.2"
    """The particles and Δp make the lip shape of the deformer's own visemes (normalised)."""
    particle_anchor: float = 0.1
    """Weight of the particles' rest anchor inside the regulariser."""
    lambda_perc: float = 0.2
    """LPIPS weight inside the image term."""
    lambda_hand: float = 0.5
    """Hand keypoints' weight inside the keypoint term."""
    kpt_centred: bool = True
    """Compare face keypoints about each frame's centroid (the mouth's shape, not head drift)."""
    train_audio: bool = False
    """Also update the audio front-end (otherwise it stays as shipped)."""
    train_template_head: bool = False
    """Also update the template head (jaw, brows, head and arm rotations), which one person's
    few clips of a stochastic teacher over-fit; by default the identity-specific parts learn:
    avatar tokens, the particle motion head, the Gaussian head and the Gaussians."""
    lr: float = 3e-4
    """Deformer learning rate."""
    lr_gaussians: float = 1e-3
    """Canonical Gaussians' colour, opacity and scale learning rate (0 freezes them)."""
    arap_gaussians: int = 2048
    """Moving Gaussians in the ARAP graph."""


class FinetuneObjective(nn.Module):
    """The deformer + the avatar's canonical Gaussians as parameters; forward = one step's terms."""

    def __init__(self, deformer: SpeechDeformer, scene: DistillScene, teacher: Teacher,
                 cfg: FinetuneConfig = FinetuneConfig()):  # fmt: skip
        super().__init__()
        self.deformer, self.scene, self.teacher, self.cfg = deformer, scene, teacher, cfg
        g = scene.rig.gaussians
        self.canonical = g
        self.sh0 = nn.Parameter(g.sh[:, 0].clone())
        self.opacity = nn.Parameter(g.opacity_logits.clone())
        self.log_scales = nn.Parameter(g.log_scales.clone())
        self.weights = {k: Weight.parse(getattr(cfg, f"lambda_{k}"))
                        for k in ("vsd", "kpt", "img", "reg", "lips")}  # fmt: skip
        rig = scene.rig
        self.particle_graph = ArapGraph.build(rig.particles.rest)
        gen = torch.Generator().manual_seed(0)
        sub = rig.moving[torch.randperm(len(rig.moving), generator=gen)[: cfg.arap_gaussians]]
        self.arap_ids = sub.sort().values
        self.gauss_graph = ArapGraph.build(g.means[self.arap_ids])
        self.lip_ids = action_index(rig.template, PARTICLE_ACTIONS)

    def gaussians(self) -> Gaussians:
        sh = torch.cat([self.sh0[:, None], self.canonical.sh[:, 1:]], 1)
        return self.canonical.replace(
            sh=sh, opacity_logits=self.opacity, log_scales=self.log_scales
        )

    def param_groups(self) -> list[dict]:
        d = self.deformer
        d.audio.requires_grad_(self.cfg.train_audio)
        for part in (d.rnn, d.controls, d.visemes, d.gate, d.proj_a, d.text, d.proj_z):
            part.requires_grad_(self.cfg.train_template_head)
        params = [p for p in self.deformer.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": self.cfg.lr}]
        if self.cfg.lr_gaussians > 0:
            groups.append({"params": [self.sh0, self.opacity, self.log_scales],
                           "lr": self.cfg.lr_gaussians})  # fmt: skip
        else:
            for p in (self.sh0, self.opacity, self.log_scales):
                p.requires_grad_(False)
        return groups

    def motion(self, window: Window, text: Tensor | None):
        """The deformer's motion over the window."""
        scene, model = self.scene, self.deformer
        tokens = scene.rig.tokens(model)  # the rig's Gaussians are this step's (see `forward`)
        samples = torch.from_numpy(scene.clips[window.clip].samples)
        # truncated back-propagation through time: the state (GRU, particle transforms, smoothed
        # bones) is warmed up without gradients over the frames before the window, as when
        # driving a whole file, instead of starting every window cold
        warm = min(window.start, self.cfg.warmup_frames)
        state = model.start(tokens)
        state.frame = window.start - warm
        if warm:
            with torch.no_grad():
                _, state = model(
                    samples, tokens, state, warm, scene.fps, text, torch.zeros(1, dtype=torch.long)
                )
        moving = scene.rig.moving  # the Gaussian head's domain, as when driving
        motion = model(samples, tokens, state, window.num, scene.fps, text, moving)[0]
        return motion.spread(moving, len(scene.rig.gaussians))

    def student(self, window: Window, motion, blink: Tensor):
        """Our frames [T, H, W, 3] and posed Gaussians per frame."""
        posed = list(self.scene.rig.posed_frames(motion, blink))
        return self.scene.render(posed, window.camera), posed

    def arap(self, motion) -> Tensor:
        """ARAP on the particles (own transforms) and on a fixed subset of moving Gaussians
        (their blended particle transform + Δp), both in canonical space, plus a weak anchor of
        the particles to their rest places: ARAP does not see a whole patch sliding rigidly,
        and large motion belongs to the skeleton, the particles carry local motion."""
        parts = self.scene.rig.particles
        t = motion.particles  # [T, M, 4, 4]
        moved = (t[..., :3, :3] @ parts.rest[None, :, :, None])[..., 0] + t[..., :3, 3]
        loss = loss_arap(self.particle_graph, moved, t[..., :3, :3])
        loss = loss + self.cfg.particle_anchor * ((moved - parts.rest) ** 2).sum(-1).mean()
        ids = self.arap_ids
        pos, b = parts.move(self.canonical.means[ids], t, motion.offsets[:, ids], ids)
        with torch.no_grad():  # ARAP's local step: the nearest rotation, held fixed
            u, _, vh = torch.linalg.svd(b[..., :3, :3])
            rot = u @ vh
        return loss + loss_arap(self.gauss_graph, pos, rot)

    def forward(
        self, step: int, rng: np.random.Generator, gen: torch.Generator
    ) -> dict[str, Tensor]:
        scene, cfg = self.scene, self.cfg
        window = scene.sample_window(rng, cfg.frames, self.teacher.aligned_windows)
        scene.rig.gaussians = self.gaussians()  # the teacher renders them, the student moves them
        clip = scene.clips[window.clip]
        text = self.deformer.transcript_embedding(clip.transcript) if rng.uniform() < 0.5 else None
        motion = self.motion(window, text)
        # a frozen template head cannot follow the teacher's skeleton (its idle head drift is
        # seeded noise); chasing it taught the particles to sway the face in pauses
        bones = None if cfg.train_template_head else motion.bones.detach()
        teach = self.teacher(scene, window, bones)
        if teach.controls is not None:
            blink = teach.controls.actions[:, scene.rig.blink_ids[0]]
        else:
            from deform.controls import blinks

            blink = torch.from_numpy(blinks(window.num, scene.fps, 0, window.start))
        frames, posed = self.student(window, motion, blink)
        terms: dict[str, Tensor] = {}
        w = {k: f(step) for k, f in self.weights.items()}
        if teach.frames is not None and w["img"] > 0:
            terms["img"] = w["img"] * loss_image(frames, teach.frames, cfg.lambda_perc)
        if teach.keypoints is not None and w["kpt"] > 0:
            ours = scene.keypoints(posed, window.camera, teach.keypoint_ids)
            terms["kpt"] = w["kpt"] * loss_keypoints(ours, teach.keypoints, teach.keypoint_hand,
                                                     teach.visible, cfg.lambda_hand,
                                                     centred=cfg.kpt_centred)  # fmt: skip
        if w["vsd"] > 0:
            vsd = self.teacher.score_loss(frames, window, gen)
            if vsd is not None:
                terms["vsd"] = w["vsd"] * vsd
        if w["reg"] > 0:
            terms["reg"] = w["reg"] * self.arap(motion)
        if w["lips"] > 0:  # on the ARAP graph's Gaussians: a fixed sample of the moving ones
            ids = self.arap_ids
            terms["lips"] = w["lips"] * loss_lip_motion(
                scene.rig, self.canonical.means, motion, ids, motion.offsets[:, ids], self.lip_ids
            )
        return terms


class SharedObjective(nn.Module):
    """One deformer distilled over several avatars (the shipped checkpoint): each step draws one
    avatar's `FinetuneObjective` and takes its step. The avatars' Gaussians stay as they are
    (`lr_gaussians` 0): only the deformer is state, so checkpoints hold it alone."""

    def __init__(self, deformer: SpeechDeformer, objectives: list[FinetuneObjective]):
        super().__init__()
        if any(o.deformer is not deformer or o.cfg != objectives[0].cfg for o in objectives):
            raise ValueError("shared distillation: one deformer and one config for all avatars")
        if objectives[0].cfg.lr_gaussians > 0:
            raise ValueError("shared distillation: the avatars' Gaussians stay frozen")
        self.deformer = deformer
        self.objectives = list(objectives)  # a plain list: not submodules, not in the state

    def param_groups(self) -> list[dict]:
        groups = [o.param_groups() for o in self.objectives]  # each freezes its Gaussians
        return groups[0]

    def forward(
        self, step: int, rng: np.random.Generator, gen: torch.Generator
    ) -> dict[str, Tensor]:
        return self.objectives[int(rng.integers(len(self.objectives)))](step, rng, gen)
