"""Create's appearance stage: the template's Gaussians, one photo of the posed template, and
out come the avatar's canonical Gaussians.

1. the feed-forward reconstructor's one pass (when there is one);
2. colours for what the photo does not see well, completed from parts like it
   (`reconstruct.complete`), replacing whatever the pass put there;
3. personalisation: a copy of the reconstructor's Gaussian decoder fine-tuned on the photo;
4. per-Gaussian refinement against the photo (`reconstruct.refine`), which changes only the
   colours the photo sees well: the completed ones stay as they are.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deform.skinning import apply_blend
from deform.templates import BodyTemplate
from render import Cameras, Gaussians
from render.sh import rgb_to_sh0, sh0_to_rgb

from .canonical import Binding
from .complete import colour_prior, hand_strays, judged_hands, well_seen
from .refine import (
    RefineConfig,
    View,
    appearance_loss,
    photo_pixels,
    posed_blend,
    refine_appearance,
)

# decoder personalisation steps (at `RefineConfig.lr_decoder`): 25 at 2e-4 give the input-view
# PSNR and the unseen-sides figures of 50 at 1e-4 in half the time (README, "Creating avatars")
PERSONALISE_STEPS = 25
STRAY_OPACITY = 0.05  # a hand Gaussian's where the photo shows something other than the hand


@dataclass
class Observation:
    """One photo of the template in a pose: what the appearance stage fits."""

    template: BodyTemplate
    binding: Binding
    transforms: Tensor  # [J, 4, 4] the photo's pose
    camera: Cameras  # 1 view, the working crop
    image: Tensor  # [H, W, 3] in [0, 1]
    mask: Tensor  # [H, W] in [0, 1]
    landmarks: dict[str, np.ndarray] | None = None  # the photo's in the crop: "face" [P, 2],
    # "hand_left", "hand_right" [21, 2]
    hand_boxes: dict | None = None  # "hand_left"/"hand_right" -> box in crop pixels
    close_up: View | None = None  # the face at the photo's own resolution (refinement)


def recolour(g: Gaussians, rgb: Tensor) -> Gaussians:
    """`g` with its base colour (SH band 0) set to `rgb` [N, 3]."""
    return g.replace(sh=torch.cat([rgb_to_sh0(rgb)[:, None], g.sh[:, 1:]], 1))


def fade_strays(obs: Observation, g: Gaussians) -> Gaussians:
    """`g` with the hand Gaussians where the photo shows something else (`hand_strays`: the
    shirt beside a hand the template misses by a few pixels) nearly transparent: no hand is
    there, and a skin-coloured one would smear the shirt in the photo's own view. The
    refinement may raise them again where the photo wants them (holding them faded cost the
    half-body woman 0.5 dB of her own view and changed nothing from the side)."""
    if not judged_hands(obs.landmarks):
        return g
    with torch.no_grad():
        posed = apply_blend(g, posed_blend(obs.binding, obs.transforms))
        pixels = photo_pixels(posed, obs.camera, obs.image, obs.mask)
        seen = well_seen(posed, obs.camera, obs.binding, obs.landmarks)
        strays = hand_strays(posed, obs.camera, obs.binding, obs.landmarks, pixels, seen)
    logits = g.opacity_logits.clone()
    logits[strays] = math.log(STRAY_OPACITY / (1 - STRAY_OPACITY))
    return g.replace(opacity_logits=logits)


def reconstruct_appearance(obs: Observation, canonical: Gaussians, model=None,
                           refine_steps: int = RefineConfig.steps, personalise_steps: int = PERSONALISE_STEPS, seed: int = 0,
                           progress: bool = True) -> tuple[Gaussians, dict[str, float]]:  # fmt: skip
    """The avatar's canonical Gaussians from the template's (`canonical`, sampled by
    `sample_canonical`) and the seconds spent {"reconstruct_s", "refine_s"}. `model`: a
    `reconstruct.network.Reconstructor` or None (start from the template)."""
    from .feedforward import personalise_decoder, prepare_inputs

    times = {"reconstruct_s": 0.0, "refine_s": 0.0}
    refine = RefineConfig(steps=refine_steps)

    def prior(g: Gaussians, given: bool) -> Tensor:
        return colour_prior(g, obs.binding, obs.template, obs.transforms, obs.camera, obs.image,
                            obs.mask, obs.landmarks, sh0_to_rgb(g.sh[:, 0]) if given else None)  # fmt: skip

    t0 = time.perf_counter()
    anchors = canonical.means  # the template's surface, where every Gaussian starts
    if model is not None:
        inp = prepare_inputs(canonical, obs.binding, obs.transforms, obs.camera, obs.image,
                             obs.mask, model.cfg, hand_boxes=obs.hand_boxes, seed=seed)  # fmt: skip
        with torch.no_grad():
            features = model.features(inp)
            canonical = model.decoder(features, inp)
    start = prior(canonical, given=model is not None)
    canonical = fade_strays(obs, recolour(canonical, start))
    times["reconstruct_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if model is not None and refine_steps > 0 and personalise_steps > 0:
        # no cover term here: through the shared decoder it grows every Gaussian
        # (`reconstruct.cover`)
        objective = appearance_loss(canonical, obs.binding, obs.transforms, obs.camera, obs.image,
                                    obs.mask, refine, start, obs.close_up, obs.landmarks,
                                    cover=False)  # fmt: skip
        tuned = personalise_decoder(model, inp, features, objective, personalise_steps,
                                    refine.lr_decoder, progress)  # fmt: skip
        seen = objective.seen[:, None]  # the decoder's new colours count only where seen
        canonical = fade_strays(obs, recolour(tuned, torch.where(seen, sh0_to_rgb(tuned.sh[:, 0]),
                                                                 start)))  # fmt: skip
    if refine_steps > 0:
        canonical = refine_appearance(canonical, obs.binding, obs.transforms, obs.camera,
                                      obs.image, obs.mask, refine, progress=progress,
                                      prior=sh0_to_rgb(canonical.sh[:, 0]),
                                      close_up=obs.close_up, landmarks=obs.landmarks,
                                      anchors=anchors)  # fmt: skip
    times["refine_s"] = time.perf_counter() - t0
    return canonical, times
