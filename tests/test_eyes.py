"""Blinks paint the lid over the eye the photo shows open (deform.eyes)."""

from __future__ import annotations

import numpy as np
import torch

from deform.eyes import EYE_OUTLINES, EyeCover, eye_cover
from render import Cameras, Gaussians, intrinsics, look_at
from render.sh import rgb_to_sh0, sh0_to_rgb


def dots(means: torch.Tensor, rgb: torch.Tensor) -> Gaussians:
    n = len(means)
    return Gaussians(means, torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
                     torch.full((n, 3), -6.0), torch.full((n,), 3.0),
                     sh=rgb_to_sh0(rgb)[:, None].repeat(1, 4, 1) * torch.tensor([1, .1, .1, .1])[:, None])  # fmt: skip


def test_eye_cover_finds_the_open_eye_and_sweeps_the_lid_down():
    """Gaussians that project into a face-mesh eye outline and sit on the front of an eyeball
    are the open eye; the lid colour comes from the image above the eye; at blink w the lid
    covers heights below 1.2 w, with everything else untouched."""
    size = 200
    cam = Cameras(look_at(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3)),
                  intrinsics(30.0, size, size)[None], size, size)  # fmt: skip
    eyes = torch.tensor([[-0.03, 0.0, 0.0], [0.03, 0.0, 0.0]])  # eyeball centres
    # per eye, a grid in front of the eyeball; plus one far behind it on the same ray
    grid = torch.stack(torch.meshgrid(torch.linspace(-0.008, 0.008, 5),
                                      torch.linspace(-0.012, 0.012, 5), indexing="xy"), -1)  # fmt: skip
    grid = torch.cat([grid.reshape(-1, 2), torch.full((25, 1), 0.012)], -1)
    means = torch.cat([eyes[0] + grid, eyes[1] + grid, eyes[:1] + torch.tensor([0, 0, -0.2])])
    rgb = torch.full((len(means), 3), 0.1)  # dark: iris
    posed = dots(means, rgb)

    image = np.zeros((size, size, 3), np.uint8)
    image[:] = (200, 150, 120)  # skin everywhere the probe looks
    landmarks = np.zeros((478, 2))
    for (upper, lower), centre in zip(EYE_OUTLINES, [eyes[1], eyes[0]], strict=True):
        c = cam.project(centre[None] + torch.tensor([[0, 0, 0.012]]))[0, 0].numpy()
        xs = np.linspace(-12, 12, len(upper))  # pixels, corner to corner
        landmarks[list(upper)] = np.stack([c[0] + xs, c[1] - 6 * np.cos(xs / 12 * np.pi / 2)], -1)
        landmarks[list(lower)] = np.stack([c[0] + xs, c[1] + 6 * np.cos(xs / 12 * np.pi / 2)], -1)

    cover = eye_cover(posed, eyes, cam, image, landmarks)
    assert len(cover.ids) > 20 and len(means) - 1 not in cover.ids.tolist()  # not the head behind
    assert torch.allclose(cover.lid_rgb, torch.tensor([200, 150, 120]) / 255.0)
    # image y grows downwards: the top row of the grid (largest y in the world) is near height 0
    y = means[cover.ids, 1]
    assert cover.height[y == y.max()].max() < 0.3 and cover.height[y == y.min()].min() > 0.7

    assert cover.paint(posed, 0.0) is posed
    half, full = cover.paint(posed, 0.5), cover.paint(posed, 1.0)
    lid = cover.lid_rgb[0]
    painted = lambda g: (sh0_to_rgb(g.sh[:, 0]) - lid).norm(dim=-1) < 1e-4  # noqa: E731
    assert painted(full)[cover.ids].all() and not painted(full)[-1]
    assert torch.equal(full.sh[cover.ids, 1:], torch.zeros_like(full.sh[cover.ids, 1:]))
    upper_half = cover.ids[cover.height < 0.35]
    lower_half = cover.ids[cover.height > 0.85]
    assert painted(half)[upper_half].all() and not painted(half)[lower_half].any()
    assert torch.equal(full.means, posed.means)

    # a lid Gaussian above the outline (the photo's eye painted a little off the template's)
    # takes the lid colour from the blink's start; one behind the eye does not
    lid_at = torch.cat([means, eyes[:1] + torch.tensor([[0.0, 0.02, 0.012]])])
    posed = dots(lid_at, torch.full((len(lid_at), 3), 0.1))
    lids = torch.zeros(len(lid_at), dtype=torch.bool)
    lids[[-1, -2]] = True
    with_lids = eye_cover(posed, eyes, cam, image, landmarks, lids)
    assert len(with_lids.ids) == len(cover.ids) + 1 and with_lids.ids[-1] == len(lid_at) - 1
    assert with_lids.height[-1] == 0 and painted(with_lids.paint(posed, 0.2))[-1]


def test_rig_paints_blinks_only_when_it_has_an_eye_cover():
    from .helpers import template_avatar

    avatar = template_avatar(1500)
    from avatar.pipelines.drive import Driver

    rig = Driver(avatar).rig
    assert rig.eyes is None  # the grey template has no face MediaPipe finds
    e = len(rig.template.expression_names)
    transforms = rig.transforms(torch.zeros(1, rig.driven.numel(), 3))[0]
    closed = torch.zeros(e)
    closed[rig.blink_ids] = 1.0
    before = rig.pose(closed, transforms)
    ids = torch.arange(10)
    rig.eyes = EyeCover(ids, torch.zeros(10), torch.tensor([[1.0, 0.0, 0.0]]).repeat(10, 1))
    after = rig.pose(closed, transforms)
    assert torch.allclose(sh0_to_rgb(after.sh[ids, 0]), torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.equal(after.sh[10:], before.sh[10:]) and torch.equal(after.means, before.means)
    still = rig.pose(torch.zeros(e), transforms)  # eyes open: nothing painted
    assert not torch.allclose(sh0_to_rgb(still.sh[ids, 0]), torch.tensor([1.0, 0.0, 0.0]))
