"""Shared test helpers: small random scenes, cameras, and skip markers."""

from __future__ import annotations

import io
import math
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from render import Cameras, Gaussians, intrinsics, look_at

SHARED_DATA = Path(
    os.environ.get("AVATAR_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data")
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def avatar_in_process(*args: str) -> subprocess.CompletedProcess:
    """`avatar ARGS` run by the console script's own `main()` in this process, its exit code and
    output as `subprocess.run` gives them: for refusals, which end before any work, where a new
    process per case spent its 2-3 s importing torch. An exception `main` lets through fails the
    test with its traceback; `test_untrusted` runs each command in a real process."""
    from avatar.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["avatar", *args], code, out.getvalue(), err.getvalue())


def random_scene(n: int = 200, sh_degree: int | None = 1, feature_dim: int = 0, seed: int = 0,
                 dtype=torch.float32) -> Gaussians:  # fmt: skip
    """Gaussians in a ~1 m cube around the origin, mixed sizes, orientations and opacities."""
    gen = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=gen) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=gen)
    log_scales = torch.log(0.01 + 0.08 * torch.rand(n, 3, generator=gen))
    logits = 2.0 * torch.randn(n, generator=gen)
    if feature_dim:
        return Gaussians(means, quats, log_scales, logits,
                         features=torch.rand(n, feature_dim, generator=gen)).to(dtype)  # fmt: skip
    sh = 0.5 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=gen)
    return Gaussians(means, quats, log_scales, logits, sh=sh).to(dtype)


def ring_cameras(num: int, width: int, height: int, radius: float = 2.5, fov: float = 45.0,
                 elevation: float = 15.0) -> Cameras:  # fmt: skip
    """Cameras on a ring around the origin, looking at it."""
    eyes = []
    for i in range(num):
        yaw = 2 * math.pi * i / num + 0.3
        el = math.radians(elevation)
        eyes.append([radius * math.cos(el) * math.sin(yaw), radius * math.sin(el),
                     radius * math.cos(el) * math.cos(yaw)])  # fmt: skip
    eyes = torch.tensor(eyes)
    views = look_at(eyes, torch.zeros_like(eyes))
    ks = intrinsics(fov, width, height).expand(num, 3, 3).clone()
    return Cameras(views, ks, width, height)


def template_avatar(num: int = 4000, seed: int = 0):
    """A small avatar straight from the Anny template (no photo): grey-brown Gaussians in the
    rest pose, with particles; what drive needs, in about a second once Anny is cached."""
    from avatar.asset import Avatar
    from deform.particles import template_particles
    from deform.templates import load_template
    from reconstruct.canonical import PART_CODES, sample_canonical
    from render import Cameras, intrinsics, look_at
    from render.sh import rgb_to_sh0

    tpl = load_template("anny")
    shape = tpl.default_shape()
    g, b = sample_canonical(tpl, shape, num, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.tensor([0.75, 0.55, 0.45]) + 0.1 * torch.rand(num, 3, generator=gen)
    rgb[b.parts == PART_CODES["lips"]] = torch.tensor([0.7, 0.25, 0.25])
    rgb[b.parts == PART_CODES["mouth"]] = torch.tensor([0.3, 0.1, 0.1])
    g = g.replace(sh=rgb_to_sh0(rgb)[:, None])
    particles = template_particles(tpl, shape, PART_CODES, b.face_ids, b.bary, seed=seed)
    eye = torch.tensor([[0.0, 0.3, 3.0]])
    cam = Cameras(look_at(eye, torch.zeros(1, 3)), intrinsics(40, 256, 256)[None], 256, 256)
    pose = torch.zeros(tpl.num_bones, 3)
    return Avatar(g, b, "anny", shape, pose, torch.zeros(3), cam, {}, particles=particles)


def tiny_wav2vec(folder: Path) -> Path:
    """A randomly initialised, 2-layer wav2vec 2.0 model saved like a downloaded one."""
    transformers = pytest.importorskip("transformers", reason="wav2vec 2.0 needs transformers")
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(32,) * 7)  # fmt: skip
    transformers.Wav2Vec2Model(cfg).save_pretrained(folder)
    return folder


def finetune_folder(folder: Path) -> Path:
    """`t.avatar` (2,000 template Gaussians) and 1.2 s of speech-like sound `a.wav` in `folder`:
    what a fine-tuning test drives. Skips without the Anny template."""
    pytest.importorskip("anny", reason="finetune needs the Anny template")
    from .test_deformer import speechlike
    from .test_drive import write_wav

    template_avatar(2000).save(folder / "t.avatar")
    write_wav(folder / "a.wav", speechlike(1.2).numpy())
    return folder
