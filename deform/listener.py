"""One avatar in a conversation: the speech deformer's motion, blended with listening.

`Listener.chunk` takes the speech deformer's `Motion` for a chunk of frames (made from the
avatar's own track) and returns it with the head, neck, chest and large facial actions mixed
by the own track's speech probability m (smoothed causally over about 0.1 s):

    controls = m · speech + (1 − m) · conversation model          (head, neck, chest, jaw,
                                                                   brows, smiles)

so while its own voice speaks the avatar talks exactly as `drive` makes it talk, and while the
partner speaks it listens. Gaze is the conversation model's at all times: eyes and head turn
toward the partner (`partner_yaw`, radians in the body frame, 0 straight ahead: a partner at
the camera), the eyes by the model's gaze offsets on top. Two avatars in one scene step their
models together (`Duet`), each seeing the other's motion. Blinks come faster while listening
(`controls.blinks` with rate 1 + 0.6 (1 − m)). Its lips meet while it listens: the speech
deformer's fine lip actions are mixed toward `controls.LIPS_MEET` by `LISTEN_LIPS` · (1 − m)
(`closed_lips`, passed to `SpeechDeformer.forward`); silence alone leaves the mouth as the photo
had it, parted on many photos.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from .controls import DRIVEN_BONES, TEMPLATE_ACTIONS, blinks
from .conversation import FEATURES, NUM_COARSE, TEMPERATURE, ConverseModel

HEAD_SHARE = (0.55, 0.25)  # of the partner's direction taken by the head and the neck; eyes: rest
LISTEN_BLINK_RATE = 0.6  # blinks 1.6x as often while listening
ROLE_RATE = 0.33  # per-frame causal smoothing of the speech probability (about 0.1 s at 25 fps)
LISTEN_LIPS = 0.5  # how far a listener's lips take `controls.LIPS_MEET`
# the large facial actions in the deformer's per-frame controls (after the driven bones' xyz)
ACTIONS = slice(3 * len(DRIVEN_BONES), 3 * len(DRIVEN_BONES) + len(TEMPLATE_ACTIONS))


class Listener:
    def __init__(self, model: ConverseModel, own_prob: np.ndarray, partner: np.ndarray,
                 partner_prob: np.ndarray, fps: float, seed: int = 0, partner_yaw: float = 0.0,
                 partner_pitch: float = 0.0, gaze: bool = True,
                 temperature: float = TEMPERATURE):  # fmt: skip
        if abs(fps - model.cfg.fps) > 1e-6:
            raise ValueError(f"the conversation model runs at {model.cfg.fps:g} fps (its delay and "
                             f"kernels are in its frames); --fps {fps:g} is not supported")  # fmt: skip
        self.model, self.fps, self.seed = model, fps, seed
        self.partner = partner
        self.own_prob = torch.from_numpy(np.asarray(own_prob, np.float32))
        self.partner_prob = torch.from_numpy(np.asarray(partner_prob, np.float32))
        self.partner_yaw, self.partner_pitch, self.gaze = partner_yaw, partner_pitch, gaze
        self.temperature = temperature
        self.state = model.start(seed)
        role, m = 0.0, []  # m: the speech probability smoothed causally, every frame
        for p in self.own_prob.tolist():
            role += ROLE_RATE * (p - role)
            m.append(role)
        self.role = torch.tensor(m)
        self.rows: list[np.ndarray] = []  # the final features of every frame, for reports

    def role_mix(self, start: int, num: int) -> Tensor:
        """m [num]: 1 while the avatar's own voice speaks, 0 while it listens."""
        return self.role[start : start + num]

    def closed_lips(self, start: int, num: int) -> Tensor:
        """[num]: how far the lips meet (the deformer's `closed`)."""
        return LISTEN_LIPS * (1 - self.role_mix(start, num))

    def blinks(self, start: int, num: int) -> Tensor:
        rate = 1 + LISTEN_BLINK_RATE * (1 - self.own_prob.numpy())
        return torch.from_numpy(blinks(num, self.fps, self.seed, start, rate))

    def chunk(self, motion, start: int) -> tuple[object, Tensor | None]:
        """(the blended motion, eye-bone deltas [T, 2, 3] or None) for frames start.."""
        sl = slice(start, start + len(motion.controls))
        conv, self.state = self.model.step(self.state, self.own_prob[sl], self.partner,
                                           self.partner_prob[sl], self.temperature)  # fmt: skip
        return self.blend(motion, conv, start)

    def shown(self, motion, start: int) -> tuple[Tensor, Tensor]:
        """(w, y) [T, F] for `ConverseModel.step_pair`: the speech deformer's head, neck, chest
        and face actions `y` (raw features) show with weight m instead of the model's; gaze
        is the model's."""
        num, face = len(motion.controls), NUM_COARSE + len(TEMPLATE_ACTIONS)
        w, y = torch.zeros(num, len(FEATURES)), torch.zeros(num, len(FEATURES))
        w[:, :face] = self.role_mix(start, num)[:, None]
        y[:, :NUM_COARSE] = motion.controls[:, :NUM_COARSE]
        y[:, NUM_COARSE:face] = motion.controls[:, ACTIONS]
        return w, y

    def blend(self, motion, conv: Tensor, start: int) -> tuple[object, Tensor | None]:
        """`chunk` given the conversation model's features `conv` [T, F] of its frames."""
        num = len(motion.controls)
        m = self.role_mix(start, num)[:, None]
        controls = motion.controls.clone()
        controls[:, :NUM_COARSE] = m * controls[:, :NUM_COARSE] + (1 - m) * conv[:, :NUM_COARSE]
        controls[:, 1] += HEAD_SHARE[0] * self.partner_yaw  # head.y: turn toward the partner
        controls[:, 4] += HEAD_SHARE[1] * self.partner_yaw  # neck02.y
        controls[:, 0] -= (1 - m[:, 0]) * HEAD_SHARE[0] * self.partner_pitch  # +x looks down
        fine = conv[:, NUM_COARSE : NUM_COARSE + len(TEMPLATE_ACTIONS)].clamp(0, 1)
        controls[:, ACTIONS] = m * controls[:, ACTIONS] + (1 - m) * fine
        gaze = conv[:, FEATURES.index("gazeYaw") :]
        rest = 1 - sum(HEAD_SHARE)
        yaw = gaze[:, 0] + rest * self.partner_yaw
        pitch = gaze[:, 1] + rest * self.partner_pitch  # up; the eye bones' +x looks down
        eyes = torch.stack([-pitch, yaw, torch.zeros_like(yaw)], -1)[:, None].expand(-1, 2, -1)
        final = torch.cat([controls[:, :NUM_COARSE], controls[:, ACTIONS], gaze], -1)
        self.rows.append(final.numpy())
        return replace(motion, controls=controls), (eyes.contiguous() if self.gaze else None)

    def features(self) -> np.ndarray:
        """[T, F] what the avatar did, every frame so far (head etc. include the partner turn)."""
        return np.concatenate(self.rows) if self.rows else np.zeros((0, len(FEATURES)))


class Duet:
    """The two listeners of a two-avatar scene, stepped together (`ConverseModel.step_pair`):
    each one's conversation model attends to the other's voice and to what the other shows
    (its speech deformer's head and face while it talks, its listening motion otherwise), up
    to the frame before."""

    def __init__(self, first: Listener, second: Listener):
        if first.model is not second.model:
            raise ValueError("a duet's two listeners share one conversation model")
        self.listeners = (first, second)

    def chunk(self, motions: list, start: int) -> list[tuple[object, Tensor | None]]:
        """`Listener.chunk` for both avatars' motions of frames start.. (same length)."""
        first, second = self.listeners
        sl = slice(start, start + len(motions[0].controls))
        convs, states = first.model.step_pair(
            [first.state, second.state], [first.own_prob[sl], second.own_prob[sl]],
            [second.partner, first.partner], first.temperature,
            [lis.shown(m, start) for lis, m in zip(self.listeners, motions, strict=True)],
        )  # fmt: skip
        first.state, second.state = states
        return [lis.blend(m, c, start) for lis, m, c in zip(self.listeners, motions, convs,
                                                              strict=True)]  # fmt: skip
