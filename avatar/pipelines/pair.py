"""Two avatars in one conversation, one 3D scene, one rasterisation per frame.

Each avatar is a `Driver` with a `Listener` (as in one-avatar converse): its own track is its
speaker's, its partner's is the other's. The layout (`avatar.layout`, from `--layout TEXT`)
places both on one ground plane (feet at y = 0), the first avatar on the left of the two-shot,
each turned toward the other; every frame both posed Gaussian sets are moved into the scene and
concatenated, so one rasterisation draws them and they occlude each other. Each avatar's
partner direction (for its head and eyes) is the other's head, from the layout. The two
conversation models step together (`deform.listener.Duet`): each attends to what the other
shows, frame by frame. With `--report`, per frame: who speaks, and how far each listener's head
is turned from the speaker's head (degrees, from the posed skeleton).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from deform.controls import DRIVEN_BONES
from deform.conversation import NUM_COARSE, load_converse
from deform.hands import HandState
from deform.listener import Duet, Listener
from deform.voice import Tracks, speech_probability
from render import Cameras, Gaussians, fit_to_points, intrinsics, look_at, rasterize, to_uint8
from render.io import atomic_path
from render.profiling import stage
from render.rotations import quat_multiply

from ..errors import AvatarError
from ..layout import Placement, SceneLayout, layout_from_text, toward
from .converse import ListenConfig, write_conversation
from .drive import DriveConfig, Driver, frame_count

CAMERAS = ("two-shot", "orbit", "over-shoulder-a", "over-shoulder-b")


@dataclass
class Member:
    """One avatar of the scene."""

    driver: Driver
    placement: Placement
    lift: float  # metres up so its feet stand on y = 0
    listener: Listener | None = None

    def rotation(self) -> torch.Tensor:  # [3, 3] about +Y
        a = math.radians(self.placement.yaw_deg)
        c, s = math.cos(a), math.sin(a)
        return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])

    def offset(self) -> torch.Tensor:
        return torch.tensor([self.placement.x, self.lift, self.placement.z])

    def matrix(self) -> torch.Tensor:  # [4, 4] body frame -> scene, as `place` moves Gaussians
        m = torch.eye(4)
        m[:3, :3], m[:3, 3] = self.rotation(), self.offset()
        return m

    def place(self, g: Gaussians) -> Gaussians:
        """Body frame -> scene (view-dependent colour is not turned: avatars are degree 0)."""
        r = self.rotation().to(g.means)
        half = math.radians(self.placement.yaw_deg) / 2  # the same turn as a quaternion
        turn = g.quats.new_tensor([math.cos(half), 0.0, math.sin(half), 0.0])
        return g.replace(
            means=g.means @ r.T + self.offset().to(g.means), quats=quat_multiply(turn, g.quats)
        )

    def head(self, deltas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The head joint's scene position and facing direction (the body's +Z turned by the
        skeleton), [T, 3] each, posed by head/neck/chest `deltas` [T, 9] (None: the base pose,
        [3] each): forward kinematics alone, the rest joint moved by its bone's transform."""
        if deltas is None:
            pos, fwd = self.head(torch.zeros(1, NUM_COARSE))
            return pos[0], fwd[0]
        rig, r = self.driver.rig, self.rotation()
        i = rig.template.bone_names.index("head")
        with torch.no_grad():
            rest = rig.template(rig.shape[None]).joints[0, i]
            bones = torch.zeros(len(deltas), len(DRIVEN_BONES), 3)
            bones[:, :3] = deltas.reshape(-1, 3, 3)
            t = rig.transforms(bones)[:, i].cpu()  # [T, 4, 4]
        position = t[:, :3, :3] @ rest + t[:, :3, 3]
        return position @ r.T + self.offset(), t[:, :3, 2] @ r.T  # R_head · (0, 0, 1)

    def turn_toward(self, point: torch.Tensor) -> tuple[float, float]:
        """(yaw, pitch) radians that turn its head from where it faces in the base pose (the
        photo's head may already be turned) to `point` in the scene."""
        here, facing = self.head()
        yaw, pitch = toward(self.placement, tuple(point.tolist()), tuple(here.tolist()))
        base_yaw, base_pitch = toward(self.placement, tuple((here + facing).tolist()),
                                      tuple(here.tolist()))  # fmt: skip
        return yaw - base_yaw, pitch - base_pitch


def build_scene(drivers: list[Driver], layout: SceneLayout) -> list[Member]:
    members = []
    for driver, placement in zip(drivers, layout.placements, strict=True):
        with torch.no_grad():
            feet = float(driver.rig.still().means[:, 1].quantile(0.002))
        members.append(Member(driver, placement, -feet))
    return members


def scene_cameras(members: list[Member], kind: str, width: int, height: int, num: int) -> Cameras:
    """The scene's `num` cameras (one, but for the orbit), `width` x `height` pixels."""
    if kind not in CAMERAS:
        raise AvatarError(f"--camera {kind!r}: use {', '.join(CAMERAS)}")
    if kind.startswith("over-shoulder"):
        me, other = members if kind.endswith("a") else members[::-1]
        head, forward = me.head()
        target, _ = other.head()
        side = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), forward)
        eye = head - 0.75 * forward + 0.12 * torch.tensor([0.0, 1.0, 0.0]) + 0.3 * side
        view = look_at(eye[None].double(), target[None].double()).float()
        return Cameras(view, intrinsics(40.0, width, height)[None], width, height)
    with torch.no_grad():
        points = []
        for m in members:
            g = m.place(m.driver.rig.still())
            keep = g.means[:, 1] > 0.72 * float(g.means[:, 1].max())  # chest up
            points.append(g.means[keep])
        pts = torch.cat(points)
    box = torch.stack([pts.quantile(0.01, 0), pts.quantile(0.99, 0)])
    if kind == "orbit":  # every yaw must frame the pair: their bounding sphere
        yaws = torch.arange(num, dtype=torch.float64) * 360.0 / max(num, 1)
        return fit_to_points(box, width, height, yaws, 5.0, 30.0, 0.8)
    return two_shot(box, width, height)


def two_shot(box: Tensor, width: int, height: int, fov_y: float = 30.0, fill: float = 0.85,
             elevation: float = 5.0) -> Cameras:  # fmt: skip
    """A camera in front of the pair (+Z), `elevation` degrees above, as close as lets the box
    [2, 3] (both avatars, chest up) fill `fill` of the frame's width or height, whichever binds:
    a wide frame holds two people side by side at the size a square gives one."""
    lo, hi = box.double()
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    tan_y = math.tan(math.radians(fov_y) / 2)
    tan_x = tan_y * width / height
    dist = float(half[2]) + max(float(half[0]) / (fill * tan_x), float(half[1]) / (fill * tan_y))
    el = math.radians(elevation)
    eye = centre + dist * torch.tensor([0.0, math.sin(el), math.cos(el)], dtype=torch.float64)
    view = look_at(eye[None], centre[None]).float()
    return Cameras(view, intrinsics(fov_y, width, height)[None], width, height)


def converse_pair(drivers: list[Driver], tracks: Tracks, out_path: str | Path,
                  cfg: DriveConfig, listen: ListenConfig, layout_text: str | None = None,
                  camera: str = "two-shot", report: str | Path | None = None,
                  progress: bool = True) -> dict:  # fmt: skip
    """Write the two-avatar conversation video; `tracks.own` is the first avatar's voice,
    `tracks.partner` the second's."""
    layout = layout_from_text(layout_text)
    members = build_scene(drivers, layout)
    num = frame_count(tracks.duration_s, cfg.fps)
    voices = (tracks.own, tracks.partner)
    probs = [speech_probability(v, num, cfg.fps) for v in voices]
    try:
        model = load_converse(listen.converse_model or None)
    except (ValueError, OSError) as exc:
        raise AvatarError(f"conversation model: {exc}") from None
    heads = [m.head()[0] for m in members]
    for k, m in enumerate(members):
        yaw, pitch = m.turn_toward(heads[1 - k])
        m.listener = Listener(model, probs[k], voices[1 - k], probs[1 - k], cfg.fps,
                              cfg.seed + k, yaw, pitch, temperature=listen.temperature)  # fmt: skip
    device = drivers[0].device
    cams = scene_cameras(members, camera, cfg.size, cfg.height or cfg.size, num).to(device)
    duet = Duet(members[0].listener, members[1].listener)
    bg = torch.ones(3, device=device)

    def posed():
        """Both avatars' posed Gaussians, frame by frame: each chunk's speech motion of both,
        then both listen together (the duet), then both are posed."""
        streams = [m.driver.motions(voices[k], num, m.listener) for k, m in enumerate(members)]
        hands = [HandState(), HandState()]
        for chunks in zip(*streams, strict=True):
            start = chunks[0][0]
            blended = duet.chunk([motion for _, motion in chunks], start)
            posing = []
            for k, (m, (motion, eyes)) in enumerate(zip(members, blended, strict=True)):
                frames_k, hands[k] = m.driver.pose_chunk(motion, start, hands[k], m.listener, eyes,
                                                         m.matrix())  # fmt: skip
                posing.append(frames_k)
            yield from zip(*posing, strict=True)

    def frames():
        bar = tqdm(total=num, unit="frame", desc="converse", disable=not progress)
        with bar, torch.no_grad():
            for i, both in enumerate(posed()):
                with stage("rig"):
                    scene = Gaussians.cat(list(both))  # placed by their skinning
                cam = cams[min(i, len(cams) - 1)]
                with stage("render"):
                    frame = to_uint8(rasterize(scene, cam, background=bg).rgb[0, ..., :3])
                yield frame
                bar.update(1)

    count = write_conversation(out_path, frames(), tracks, cfg.fps)
    gaze = gaze_report(members, probs)
    summary = {"frames": count, "fps": cfg.fps, "video_s": round(count / cfg.fps, 3),
               "layout": layout.layout.name, "matched": layout.matched,
               "distance_m": round(layout.distance, 3), "camera": camera,
               "placements": [vars(p) for p in layout.placements], **gaze["summary"]}  # fmt: skip
    if report:
        detail = {"frames_detail": gaze["frames"],
                  **{f"speech_probability_{k + 1}": np.round(p, 3).tolist()
                     for k, p in enumerate(probs)}}  # fmt: skip
        with atomic_path(report) as tmp_path:
            tmp_path.write_text(json.dumps({**summary, **detail}))
    return summary


def gaze_report(members: list[Member], probs: list[np.ndarray]) -> dict:
    """Per frame: how far each avatar's head faces from the other's head (degrees), and the
    median over the frames where it listens (only the other speaks)."""
    posed = [m.head(torch.from_numpy(m.listener.features()[:, :NUM_COARSE]).float())
             for m in members]  # fmt: skip
    angles = []
    for k in range(2):
        (head, forward), (other, _) = posed[k], posed[1 - k]
        to = torch.nn.functional.normalize(other - head, dim=-1)
        cos = torch.nn.functional.normalize(forward, dim=-1).mul(to).sum(-1).clamp(-1, 1)
        angles.append(torch.rad2deg(torch.acos(cos)).numpy())
    rows = [{f"head_to_partner_deg_{k + 1}": round(float(angles[k][t]), 2) for k in range(2)}
            for t in range(len(angles[0]))]  # fmt: skip
    summary = {}
    for k in range(2):
        listening = (probs[1 - k] >= 0.5) & (probs[k] < 0.5)
        a = angles[k][listening[: len(angles[k])]]
        summary[f"listening_head_to_speaker_deg_{k + 1}"] = float(np.median(a)) if len(a) else None
    return {"summary": summary, "frames": rows}
