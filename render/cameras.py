"""Pinhole cameras in the OpenCV convention (see CONVENTIONS.md).

`Cameras` batches C views of one image size. Builders: `look_at`, `orbit`, `fit_to_points`
(with `scene_points`, a scene's robust bounding box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .gaussians import Gaussians

WORLD_UP = (0.0, 1.0, 0.0)  # +Y up


@dataclass
class Cameras:
    viewmats: Tensor  # [C, 4, 4] world-to-camera
    Ks: Tensor  # [C, 3, 3] intrinsics, pixels
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.viewmats.ndim != 3 or self.viewmats.shape[1:] != (4, 4):
            raise ValueError(f"viewmats must be [C,4,4], got {tuple(self.viewmats.shape)}")
        if self.Ks.shape != (self.viewmats.shape[0], 3, 3):
            raise ValueError(f"Ks must be [C,3,3] matching viewmats, got {tuple(self.Ks.shape)}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")

    def __len__(self) -> int:
        return self.viewmats.shape[0]

    def __getitem__(self, index) -> Cameras:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Cameras(self.viewmats[index], self.Ks[index], self.width, self.height)

    def to(self, *args, **kwargs) -> Cameras:
        return Cameras(self.viewmats.to(*args, **kwargs), self.Ks.to(*args, **kwargs),
                       self.width, self.height)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    @property
    def centers(self) -> Tensor:  # [C, 3] camera centres in world space: -R^T t
        rot, t = self.viewmats[:, :3, :3], self.viewmats[:, :3, 3]
        return -(rot.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)

    def project(self, points: Tensor) -> Tensor:  # [P, 3] world -> [C, P, 2] pixels
        """Pinhole projection of world points into every camera (depth clamped at 1 mm)."""
        cam = points @ self.viewmats[:, :3, :3].transpose(1, 2) + self.viewmats[:, None, :3, 3]
        z = cam[..., 2].clamp_min(1e-3)
        x = self.Ks[:, None, 0, 0] * cam[..., 0] / z + self.Ks[:, None, 0, 2]
        y = self.Ks[:, None, 1, 1] * cam[..., 1] / z + self.Ks[:, None, 1, 2]
        return torch.stack([x, y], dim=-1)

    def resized(self, long_side: int) -> Cameras:
        """The same cameras with images `long_side` pixels on their longer side."""
        s = long_side / max(self.width, self.height)
        ks = (
            self.Ks * torch.tensor([s, s, 1.0], dtype=self.Ks.dtype, device=self.Ks.device)[:, None]
        )
        return Cameras(self.viewmats, ks, max(2, round(self.width * s)),
                       max(2, round(self.height * s)))  # fmt: skip

    @staticmethod
    def cat(items: list[Cameras]) -> Cameras:
        w, h = items[0].width, items[0].height
        if any((c.width, c.height) != (w, h) for c in items):
            raise ValueError("cannot concatenate cameras of different image sizes")
        return Cameras(torch.cat([c.viewmats for c in items]), torch.cat([c.Ks for c in items]),
                       w, h)  # fmt: skip


def intrinsics(fov_y_deg: float, width: int, height: int, dtype=torch.float32) -> Tensor:
    """K [3, 3] for a vertical field of view, square pixels, principal point at the centre."""
    fy = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    return torch.tensor([[fy, 0, width / 2], [0, fy, height / 2], [0, 0, 1]], dtype=dtype)


def look_at(
    eyes: Tensor,  # [C, 3]
    targets: Tensor,  # [C, 3]
    up: tuple[float, float, float] = WORLD_UP,
) -> Tensor:  # [C, 4, 4]
    """World-to-camera matrices for cameras at `eyes` looking at `targets` (OpenCV axes)."""
    up_t = torch.tensor(up, dtype=eyes.dtype, device=eyes.device).expand_as(eyes)
    fwd = torch.nn.functional.normalize(targets - eyes, dim=-1)
    right = torch.linalg.cross(fwd, up_t)
    degenerate = right.norm(dim=-1) < 1e-6  # looking straight along `up`: pick any right
    if degenerate.any():
        alt = torch.tensor([1.0, 0.0, 0.0], dtype=eyes.dtype, device=eyes.device)
        right[degenerate] = torch.linalg.cross(fwd[degenerate], alt.expand_as(fwd[degenerate]))
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(fwd, right)
    rot = torch.stack([right, down, fwd], dim=1)  # rows: camera axes in world coordinates
    view = torch.eye(4, dtype=eyes.dtype, device=eyes.device).repeat(eyes.shape[0], 1, 1)
    view[:, :3, :3] = rot
    view[:, :3, 3] = -(rot @ eyes.unsqueeze(-1)).squeeze(-1)
    return view


def orbit_eyes(
    center: Tensor,  # [3]
    radius: float,
    yaws_deg: Tensor,  # [C]
    elevation_deg: float = 0.0,
) -> Tensor:  # [C, 3]
    """Camera positions on a ring around +Y through `center`; yaw 0 is in front (+Z)."""
    yaw = torch.deg2rad(yaws_deg.to(center.dtype))
    el = math.radians(elevation_deg)
    offset = torch.stack(
        [
            radius * math.cos(el) * torch.sin(yaw),
            torch.full_like(yaw, radius * math.sin(el)),
            radius * math.cos(el) * torch.cos(yaw),
        ],
        dim=-1,
    )
    return center + offset


def orbit(
    center: Tensor,  # [3]
    radius: float,
    num_views: int,
    width: int,
    height: int,
    fov_y_deg: float = 30.0,
    elevation_deg: float = 0.0,
    start_yaw_deg: float = 0.0,
) -> Cameras:
    """`num_views` cameras evenly spaced on a turntable ring, all looking at `center`."""
    yaws = start_yaw_deg + torch.arange(num_views, dtype=torch.float64) * (360.0 / num_views)
    eyes = orbit_eyes(center.double(), radius, yaws, elevation_deg)
    views = look_at(eyes, center.double().expand_as(eyes)).to(center.dtype)
    ks = intrinsics(fov_y_deg, width, height, center.dtype).to(center.device)
    return Cameras(views.to(center.device), ks.expand(num_views, 3, 3).clone(), width, height)


def fit_to_points(
    points: Tensor,  # [P, 3]
    width: int,
    height: int,
    yaws_deg: Tensor | float = 0.0,  # [C] or scalar
    elevation_deg: float = 0.0,
    fov_y_deg: float = 30.0,
    fill: float = 0.6,
) -> Cameras:
    """Cameras looking at the points' bounding-box centre from the given yaws, at a distance where
    the bounding sphere spans `fill` of the shorter image side (so every yaw frames it)."""
    where, points = points.device, points.detach().cpu()  # camera maths on the CPU, in float64
    lo, hi = points.min(0).values, points.max(0).values
    center = (lo + hi) / 2
    extent = (hi - lo).norm().item() / 2  # bounding-sphere radius
    fov = math.radians(fov_y_deg)
    fov_short = fov if height <= width else 2 * math.atan(math.tan(fov / 2) * width / height)
    # a sphere of radius r at distance d subtends 2*asin(r/d); make that `fill` of the view
    half = math.atan(fill * math.tan(fov_short / 2))
    dist = extent / math.sin(half)
    yaws = torch.as_tensor(yaws_deg, dtype=torch.float64).reshape(-1)
    eyes = orbit_eyes(center.double(), dist, yaws, elevation_deg)
    views = look_at(eyes, center.double().expand_as(eyes)).to(points.dtype).to(where)
    ks = intrinsics(fov_y_deg, width, height, points.dtype).to(where)
    return Cameras(views, ks.expand(len(yaws), 3, 3).clone(), width, height)


def scene_points(gaussians: Gaussians, min_opacity: float = 0.05) -> Tensor:
    """Corners of a robust bounding box (0.5-99.5 percentiles of visible Gaussians), [2, 3]:
    a few stray floaters must not shrink the subject in the frame."""
    means = gaussians.means.detach()
    visible = gaussians.opacities.detach() > min_opacity
    pts = means[visible] if visible.sum() >= 8 else means
    if len(pts) > 200_000:  # quantile needs a bounded sample
        pts = pts[torch.randperm(len(pts), generator=torch.Generator().manual_seed(0))[:200_000]]
    q = torch.tensor([0.005, 0.995], dtype=pts.dtype, device=pts.device)
    return torch.quantile(pts, q, dim=0)
