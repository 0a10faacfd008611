"""The converse pipeline: one avatar in a conversation -> a video where it talks and listens.

The avatar's own track drives it exactly as `drive` does; the partner's track (a second file,
or the other channel of a stereo file) makes it listen (`deform.listener`, the conversation
model of `deform.conversation`). Both voices are in the video's sound track. With `--report`,
a JSON file beside the video holds the tracks' speech probabilities, what the avatar did each
frame and the figures of `distill.converse_measures`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deform.audio import SAMPLE_RATE, AudioError
from deform.conversation import FEATURES, TEMPERATURE, load_converse
from deform.listener import Listener
from deform.voice import Tracks, conversation_tracks, speech_probability
from distill import converse_measures
from render.io import atomic_path

from ..asset import Avatar
from ..errors import AvatarError
from ..media import write_video, write_wav
from .drive import DriveConfig, Driver, frame_count


@dataclass(frozen=True)
class ListenConfig:
    partner_yaw: float = 0.0
    """Where the partner is, degrees of yaw in the avatar's body frame (0: in front, at the
    camera; 90: to the avatar's left). Head and eyes turn toward it."""
    temperature: float = TEMPERATURE
    """How far the listening motion strays from the model's most likely motion (1: the
    learned spread, livelier and less like the training motion)."""
    converse_model: str = ""
    """A conversation-model checkpoint (python -m distill.train_converse) instead of the
    shipped one."""


def load_tracks(audio: str | Path, partner: str | Path | None = None, channel: str | None = None,
                speaker: int | None = None) -> Tracks:  # fmt: skip
    try:
        tracks = conversation_tracks(audio, partner, channel, speaker)
    except AudioError as exc:
        raise AvatarError(str(exc)) from None
    if np.abs(tracks.partner).max() < 1e-4:
        raise AvatarError(f"{tracks.source}: the partner's track is silent; for one voice alone "
                          "use avatar drive")  # fmt: skip
    return tracks


def write_conversation(out_path: str | Path, frames, tracks: Tracks, fps: float) -> int:
    """The video (atomically) with both voices mixed into its sound track; the frame count."""
    with tempfile.TemporaryDirectory() as tmp:
        mix = Path(tmp) / "conversation.wav"
        write_wav(mix, tracks.mix(), SAMPLE_RATE)
        return write_video(out_path, frames, fps=fps, audio_path=mix)


def converse_avatar(avatar: Avatar, tracks: Tracks, out_path: str | Path,
                    cfg: DriveConfig | None = None, listen: ListenConfig = ListenConfig(),
                    report: str | Path | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Write the conversation video (H.264 + both voices as AAC) atomically; returns a summary
    (and writes it, with per-frame tracks, to `report` when given). `cfg`: drive's options
    (size, framing, view, fps, seed ...)."""
    cfg = cfg or DriveConfig()
    if cfg.fps <= 0 or not math.isfinite(cfg.fps):
        raise AvatarError(f"--fps {cfg.fps}: must be a positive number")
    if not 0 <= listen.temperature <= 2:
        raise AvatarError(f"--temperature {listen.temperature}: use a number from 0 to 2")
    try:
        model = load_converse(listen.converse_model or None)
    except (ValueError, OSError) as exc:
        raise AvatarError(f"conversation model: {exc}") from None
    num = frame_count(tracks.duration_s, cfg.fps)
    own_prob = speech_probability(tracks.own, num, cfg.fps)
    partner_prob = speech_probability(tracks.partner, num, cfg.fps)
    driver = Driver(avatar, cfg)
    eyes = {"eye.L", "eye.R"} <= set(driver.rig.template.bone_names)
    try:
        listener = Listener(model, own_prob, tracks.partner, partner_prob, cfg.fps, cfg.seed,
                            math.radians(listen.partner_yaw), gaze=eyes,
                            temperature=listen.temperature)  # fmt: skip
    except ValueError as exc:
        raise AvatarError(str(exc)) from None
    count = write_conversation(out_path, driver.frames(tracks.own, num, progress, listener),
                               tracks, cfg.fps)  # fmt: skip
    motion = listener.features()
    summary = {"frames": count, "fps": cfg.fps, "audio_s": round(tracks.duration_s, 3),
               "video_s": round(count / cfg.fps, 3),
               **converse_measures.summary(motion, own_prob, partner_prob, cfg.fps)}  # fmt: skip
    if report:
        full = {**summary, "source": tracks.source, "features": list(FEATURES),
                "own_speech_probability": np.round(own_prob, 3).tolist(),
                "partner_speech_probability": np.round(partner_prob, 3).tolist(),
                "motion": np.round(motion, 4).tolist()}  # fmt: skip
        with atomic_path(report) as tmp:
            tmp.write_text(json.dumps(full))
    return summary
