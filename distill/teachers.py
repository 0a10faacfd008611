"""Teachers: one interface, the avatar (a `DistillScene`) + a speech window + a camera -> teacher
frames, and teacher keypoints where available.

    teacher = make_teacher("procedural")          # or "diffusers:PATH"
    teacher.prepare(scene)                         # once: controls per clip, model loading, ...
    clip = teacher(scene, window)                  # TeacherClip for one training window

- `ProceduralTeacher` (default, offline, CPU): `distill.teacher.teach` turns each clip's audio
  (force-aligned to its transcript when there is one) into template controls; the template
  posed by them and rendered with the avatar's own Gaussians gives the frames, and the keypoint
  Gaussians projected into the camera give exact keypoints.
- `DiffusersTeacher`: a local diffusers video model conditioned on the avatar's reference render
  (`distill.diffusion_teacher`); it synthesises weak-supervision frames, MediaPipe face-mesh
  and hand detections on them are its keypoints, and it scores our renders for video score
  distillation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from deform.audio import SAMPLE_RATE
from deform.controls import Controls
from render import Cameras, Gaussians, to_uint8

from .scene import DistillScene, Window
from .teacher import TeacherConfig, phones_for, teach

log = logging.getLogger(__name__)


@dataclass
class TeacherClip:
    frames: Tensor | None  # [T, H, W, 3] in [0, 1]
    keypoints: Tensor | None  # [T, P, 2] pixels
    keypoint_ids: Tensor | None  # [P] the avatar's Gaussians they correspond to
    keypoint_hand: Tensor | None  # [P] bool
    visible: Tensor | None = None  # [T, P] bool: keypoints the teacher actually has
    controls: Controls | None = None  # template controls, when the teacher has them


class Teacher(Protocol):
    name: str
    aligned_windows: bool  # windows start at multiples of their length (cacheable teacher clips)
    frames_multiple: int  # windows hold a multiple of this many frames

    def prepare(self, scene: DistillScene) -> None: ...

    def __call__(
        self, scene: DistillScene, window: Window, bones: Tensor | None = None
    ) -> TeacherClip:
        """The teacher's clip for `window`. `bones` [T, B, 3] (driven-bone deltas), when given,
        replace the teacher's own skeleton motion where it has one: the student's, when the
        student does not learn the skeleton, so the losses compare only what it can change."""
        ...

    def score_loss(
        self, frames: Tensor, window: Window, generator: torch.Generator
    ) -> Tensor | None:
        """Video score distillation on our frames [T, H, W, 3], or None without a score model."""
        ...


class ProceduralTeacher:
    name = "procedural"
    aligned_windows = False  # any window: frames are cheap
    frames_multiple = 1

    def __init__(self, cfg: TeacherConfig | None = None):
        self.cfg = cfg or TeacherConfig()
        self.controls: list[Controls] = []

    def prepare(self, scene: DistillScene) -> None:
        self.controls = []
        for i, clip in enumerate(scene.clips):
            phones = phones_for(clip.samples, clip.transcript)
            cfg = TeacherConfig(scene.fps, self.cfg.seed + i, self.cfg.head_amplitude,
                                self.cfg.gesture_amplitude)  # fmt: skip
            self.controls.append(
                teach(scene.rig.template, clip.samples, clip.num_frames, phones, cfg)
            )

    def window_controls(self, window: Window) -> Controls:
        c = self.controls[window.clip]
        s = slice(window.start, window.start + window.num)
        return Controls(c.bones[s], c.actions[s])

    @torch.no_grad()
    def __call__(
        self, scene: DistillScene, window: Window, bones: Tensor | None = None
    ) -> TeacherClip:
        controls = self.window_controls(window)
        if bones is not None:
            controls = Controls(bones, controls.actions)
        posed = scene.pose_controls(controls)
        kpts = scene.keypoints(posed, window.camera)
        w, h = scene.size
        inside = (kpts[..., 0] >= 0) & (kpts[..., 0] < w) & (kpts[..., 1] >= 0) & (kpts[..., 1] < h)
        return TeacherClip(
            frames=scene.render(posed, window.camera),
            keypoints=kpts,
            keypoint_ids=scene.keypoint_ids,
            keypoint_hand=scene.keypoint_hand,
            visible=inside,  # keypoints outside the frame are not seen, so not compared
            controls=controls,
        )

    def score_loss(self, frames: Tensor, window: Window, generator: torch.Generator) -> None:
        return None


# MediaPipe face-mesh landmarks the diffusion teacher's keypoints use: lip contour (outer and
# inner), eye corners and lids, brows, nose tip, chin and jaw sides
FACE_LANDMARKS = (61, 291, 0, 17, 37, 267, 84, 314, 13, 14, 78, 308, 33, 133, 159, 145, 362, 263,
                  386, 374, 70, 105, 300, 334, 1, 152, 234, 454)  # fmt: skip


def face_landmarks(frames: np.ndarray) -> np.ndarray:
    """MediaPipe face mesh on RGB frames [T, H, W, 3] uint8 -> [T, L, 2] pixels of
    `FACE_LANDMARKS`, NaN where no face is found."""
    from reconstruct.parsing import FaceMesh

    out = np.full((len(frames), len(FACE_LANDMARKS), 2), np.nan)
    with FaceMesh(still=True) as mesh:
        for i, rgb in enumerate(frames):
            found = mesh(rgb)
            if found is not None:
                out[i] = found[list(FACE_LANDMARKS)]
    return out


def hand_detections(frames: np.ndarray) -> list[list[np.ndarray]]:
    """MediaPipe hands on RGB frames [T, H, W, 3] uint8 -> per frame, the hands found ([21, 2]
    pixels each), in no particular order."""
    from reconstruct.parsing import Hands

    with Hands() as hands:
        return [hands(rgb) for rgb in frames]


def assign_hands(found: list[np.ndarray], centres: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """The detections ([21, 2] each) given to the body's left and right hand -> [2, 21, 2], NaN
    where a side gets none. `centres` [2, 2]: where each hand is expected (NaN: not in view);
    `reach` [2]: how far from there a detection may be, in pixels. The closest
    detection-to-hand pairs are taken first, each detection and side once."""
    out = np.full((2, 21, 2), np.nan)
    pairs = sorted((d, i, side) for i, pts in enumerate(found) for side, c in enumerate(centres)
                   if (d := float(np.linalg.norm(pts.mean(0) - c))) <= reach[side])  # fmt: skip
    used = set()
    for _, i, side in pairs:
        if i not in used and np.isnan(out[side, 0, 0]):
            out[side] = found[i]
            used.add(i)
    return out


def hand_places(posed: Gaussians, camera: Cameras, sides: list[Tensor]):
    """Where each hand's Gaussians project ([2, 2] pixels, NaN when out of the image) and their
    projected extent ([2] pixels): where a detection of that hand may lie on this render."""
    w, h = camera.width, camera.height
    centres, reach = np.full((2, 2), np.nan), np.zeros(2)
    with torch.no_grad():
        for side, ids in enumerate(sides):
            if len(ids):
                uv = camera.project(posed.means[ids])[0].double().numpy()
                c = uv.mean(0)
                if 0 <= c[0] < w and 0 <= c[1] < h:
                    centres[side], reach[side] = c, np.linalg.norm(uv.max(0) - uv.min(0))
    return centres, reach


def bind_hands(rgb: np.ndarray, still: Gaussians, camera: Cameras, sides: list[Tensor]):
    """MediaPipe hands on a still render [H, W, 3] uint8, each bound to the Gaussians of the
    side it belongs to -> ids [2, 21] (-1: not seen), and where to look for each hand in frames
    made from this render: centres [2, 2] and a reach of 1.5 hand sizes [2] (`assign_hands`)."""
    hands = assign_hands(hand_detections(rgb[None])[0], *hand_places(still, camera, sides))
    ids = torch.full((2, 21), -1, dtype=torch.long)
    centres, reach = np.full((2, 2), np.nan), np.zeros(2)
    for side in (0, 1):
        if not np.isnan(hands[side, 0, 0]):
            pts = hands[side]
            ids[side] = bind_landmarks(torch.from_numpy(pts), still, camera, sides[side])
            centres[side] = pts.mean(0)
            reach[side] = 1.5 * np.linalg.norm(pts.max(0) - pts.min(0))
    return ids, (centres, reach)


def bind_landmarks(points: Tensor, posed: Gaussians, camera: Cameras, candidates: Tensor) -> Tensor:
    """The Gaussian under each image point [L, 2]: among `candidates` projecting within 3 px
    (else the nearest), the one closest to the camera. Returns Gaussian ids [L]."""
    uv = camera.project(posed.means[candidates])[0]  # [n, 2]
    view = camera.viewmats[0]
    depth = posed.means[candidates] @ view[2, :3] + view[2, 3]  # [n]
    d = torch.cdist(points.float(), uv.float())  # [L, n]
    near = d < 3.0
    score = torch.where(near, depth[None].expand_as(d), d + 1e3)
    return candidates[score.argmin(1)]


def window_audio(samples: np.ndarray, fps: float, window: Window) -> np.ndarray:
    """The speech of the frame slots a video teacher sees for `window`: the reference's slot
    (the frame before the window's first) and the window's frames, zeros before the clip."""
    per = SAMPLE_RATE / fps
    lo, hi = round((window.start - 1) * per), round((window.start + window.num) * per)
    out = np.zeros(hi - lo, np.float32)
    seg = samples[max(lo, 0) : hi]
    out[max(0, -lo) : max(0, -lo) + len(seg)] = seg
    return out


class DiffusersTeacher:
    """A local diffusers video model as teacher (`--teacher diffusers:PATH`): LTX-2, which hears
    the window's speech, or Stable Video Diffusion, which does not (`diffusion_teacher`).

    Frames: a clip sampled from the avatar's still render in the window's camera (cached per
    window, so each weak-supervision clip is synthesised once), with the window's speech.
    Keypoints: MediaPipe face mesh on those frames, bound to the avatar's Gaussians by detecting
    the same landmarks on the still render, and MediaPipe hands: on the still render each is
    given to the hand whose Gaussians project nearest (not by MediaPipe's handedness labels) and
    bound to them; in the synthesised frames, to the side whose still-render detection is
    nearest, within 1.5 hand sizes. Hand keypoints are used only while the skeleton trains
    (`bones` None): with a frozen skeleton the student could follow the video's arms only by
    bending its hands. Score: `distill.score.score_distillation_loss` on our frames, conditioned
    on the same reference render (and, for LTX-2, the window's speech).
    """

    name = "diffusers"
    aligned_windows = True  # windows on a grid of their length: each clip is synthesised once

    def __init__(self, path: Path, seed: int = 0, steps: int = 25, guidance: float = 1.0,
                 tau_range: tuple[float, float] = (0.02, 0.98)):  # fmt: skip
        from .diffusion_teacher import load_teacher

        self.model = load_teacher(path)
        self.seed, self.steps, self.guidance, self.tau_range = seed, steps, guidance, tau_range
        self.clips: dict[tuple[int, int, int, int], TeacherClip] = {}
        self.frames_multiple = self.model.frames_multiple  # LTX-2: its VAE's temporal stride

    def prepare(self, scene: DistillScene) -> None:
        from reconstruct.canonical import PART_CODES

        w, h = scene.size
        if w % self.model.downsample or h % self.model.downsample:
            raise ValueError(f"--size {w}: the diffusers teacher needs a multiple of "
                             f"{self.model.downsample}")  # fmt: skip
        self.fps, self.speech = scene.fps, [clip.samples for clip in scene.clips]
        with torch.no_grad():
            still = scene.rig.still()
            self.references = [scene.render([still], cam)[0] for cam in scene.cameras]
        face = torch.isin(scene.rig.parts.long(), torch.tensor([PART_CODES[p] for p in
                                                            ("face", "lips", "eyelids")]))  # fmt: skip
        candidates = torch.nonzero(face).flatten()
        sides = [torch.nonzero(scene.rig.parts.long() == PART_CODES[f"hand_{side}"]).flatten()
                 for side in ("left", "right")]  # fmt: skip
        self.landmark_ids, self.hand_ids, self.hand_search = [], [], []
        for ref, cam in zip(self.references, scene.cameras, strict=True):
            rgb = to_uint8(ref)
            found = face_landmarks(rgb[None])[0]
            ok = ~np.isnan(found[:, 0])
            ids = torch.full((len(FACE_LANDMARKS),), -1, dtype=torch.long)
            if ok.any() and len(candidates):
                pts = torch.from_numpy(found[ok])
                ids[torch.from_numpy(ok)] = bind_landmarks(pts, still, cam, candidates)
            self.landmark_ids.append(ids)
            ids, search = bind_hands(rgb, still, cam, sides)
            self.hand_ids.append(ids)
            self.hand_search.append(search)
        self.conditions = [None] * len(scene.cameras)

    @torch.no_grad()
    def __call__(
        self, scene: DistillScene, window: Window, bones: Tensor | None = None
    ) -> TeacherClip:
        """The clip for the window; `bones` given (the student's, its skeleton frozen) cannot
        pose synthesised frames, so then the hand keypoints, which follow the video's arms,
        are left out."""
        key = (window.clip, window.start, window.num, window.view)
        if key not in self.clips:
            seed = int(np.random.default_rng([self.seed, *key]).integers(1 << 31))
            audio = window_audio(self.speech[window.clip], self.fps, window)
            frames = self.model.sample(self.references[window.view], window.num, self.steps,
                                       seed=seed, audio=audio, fps=self.fps).cpu()  # fmt: skip
            rgb = to_uint8(frames)
            face, hand_ids = self.landmark_ids[window.view], self.hand_ids[window.view].flatten()
            hands = np.full((len(rgb), 2, 21, 2), np.nan)
            if (hand_ids >= 0).any():  # a hand seen on the reference render of this view
                centres, reach = self.hand_search[window.view]
                hands = np.stack([assign_hands(f, centres, reach) for f in hand_detections(rgb)])
            found = torch.cat([torch.from_numpy(face_landmarks(rgb)),
                               torch.from_numpy(hands).flatten(1, 2)], 1).float()  # fmt: skip
            ids = torch.cat([face, hand_ids])
            is_hand = torch.arange(len(ids)) >= len(face)
            bound = ids >= 0
            self.clips[key] = TeacherClip(
                frames=frames,
                keypoints=torch.nan_to_num(found[:, bound]),
                keypoint_ids=ids[bound],
                keypoint_hand=is_hand[bound],
                visible=~torch.isnan(found[:, bound, 0]),
            )
        clip = self.clips[key]
        if bones is None or clip.keypoint_hand is None or not clip.keypoint_hand.any():
            return clip
        face = ~clip.keypoint_hand
        return TeacherClip(clip.frames, clip.keypoints[:, face], clip.keypoint_ids[face],
                           clip.keypoint_hand[face], clip.visible[:, face])  # fmt: skip

    def score_loss(self, frames: Tensor, window: Window, generator: torch.Generator) -> Tensor:
        from .score import score_distillation_loss

        m = self.model
        if self.conditions[window.view] is None:  # the reference's part, once per view
            self.conditions[window.view] = m.condition(self.references[window.view], seed=self.seed,
                                                       num_frames=window.num, fps=self.fps)  # fmt: skip
        cond = self.conditions[window.view]
        if m.uses_audio:  # and the window's speech
            cond = m.with_audio(cond, window_audio(self.speech[window.clip], self.fps, window),
                                window.num, self.fps)  # fmt: skip
        latents = m.encode(frames, cond)
        return score_distillation_loss(
            latents, m.predict, m.schedule_for(latents), prediction_type=m.prediction_type,
            tau_range=self.tau_range, guidance_scale=self.guidance, cond=cond,
            uncond=m.uncondition(cond) if self.guidance != 1.0 else None, generator=generator,
        ).to(frames.device)  # fmt: skip


def make_teacher(spec: str, seed: int = 0) -> Teacher:
    """`procedural` or `diffusers:PATH` (a local diffusers model directory)."""
    if spec == "procedural":
        return ProceduralTeacher(TeacherConfig(seed=seed))
    if spec.startswith("diffusers:"):
        return DiffusersTeacher(Path(spec.split(":", 1)[1]), seed=seed)
    raise ValueError(f"--teacher {spec!r}: use procedural or diffusers:PATH")
