"""Real conversation videos -> the conversation model's training data, one command each way.

    python -m distill.extract_motion talk1.mp4 talk2.mp4 --out data/ [--channel left|right]
    python -m distill.train_converse --data data/ --out mine.safetensors

Each video shows one person on camera, both voices in its sound track: stereo with the person's
voice on `--channel`, or mixed (split into two speakers as `avatar converse --speaker` does; the
person on camera is the speaker whose turns open the mouth more, or `--speaker`). Per frame,
MediaPipe's face mesh (tracking, 478 points with depth) gives (`deform.conversation.FEATURES`):

- **head**: the rotation (Kabsch) of 18 rigid face points (forehead, nose bridge, eye corners,
  cheekbones) from the video's median face, split as the teacher splits it (head 2/3, neck
  1/3; the chest is not seen and stays 0);
- **jaw, smiles, brows**: the inner-lip gap, mouth width and brow height over the face height,
  less the video's own rest value, times the change one unit of each template action makes on
  Anny's face (`CALIBRATION`, measured on a rendered avatar, `tests/test_extract_motion.py`);
- **gaze**: the irises against the eye corners and lids, in radians (`CALIBRATION`).

The features are resampled to 25 fps; each track's speech probability comes from Silero VAD;
nods are the onsets `distill.converse_measures.nod_onsets` finds, with their amplitude. One
`.safetensors` file per video (samples, probabilities, features; its fps in the metadata).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deform.audio import AudioError, load_audio
from deform.conversation import FEATURES, NUM_COARSE
from deform.voice import speech_probability, stereo_channels

log = logging.getLogger(__name__)
FPS = 25.0
RIGID = [10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 33, 263, 133, 362, 234, 454, 127, 356]
# The change of each face-mesh measure per unit of the template action (per radian for the head
# and eyes), measured on the demo avatar's face close-up rendered at known controls (Pearson r
# 0.94 jaw, 0.996 smile, 0.86 brows, 0.998 head, 0.94 / 0.89 gaze); the test checks it on
# another avatar
CALIBRATION = {"jawOpen": 0.104, "mouthSmile": 0.053, "browInnerUp": 0.004, "headPitch": 0.88,
               "headYaw": 1.06, "gazeYaw": 0.18, "gazePitch": 0.105}  # fmt: skip


def kabsch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The rotation R [3, 3] with dst ≈ R src (both [L, 3], centred here)."""
    a, b = src - src.mean(0), dst - dst.mean(0)
    u, _, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def rotation_vector(r: np.ndarray) -> np.ndarray:
    """Axis-angle of a rotation matrix."""
    angle = np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def face_features(points: np.ndarray) -> np.ndarray:
    """[T, 478, 3] face-mesh points (pixels; NaN where no face) -> [T, F] motion features.
    Body axes: the person faces the camera, so body (+X left, +Y up, +Z front) is camera
    (x, −y, −z)."""
    body = points * np.array([1.0, -1.0, -1.0])
    ok = np.isfinite(body).all((1, 2))
    height = np.linalg.norm(points[:, 10, :2] - points[:, 152, :2], axis=1)
    out = np.full((len(points), len(FEATURES)), np.nan)
    if not ok.any():
        return out
    scale = height[:, None, None]
    rigid = body[:, RIGID] / scale
    rigid = rigid - np.nanmean(rigid, 1, keepdims=True)
    reference = np.nanmedian(rigid[ok], 0)
    gain = np.array([1 / CALIBRATION["headPitch"], 1 / CALIBRATION["headYaw"], 1.0])
    for t in np.flatnonzero(ok):
        rot = rotation_vector(kabsch(reference, rigid[t])) * gain
        out[t, 0:3], out[t, 3:6] = rot / 1.5, rot / 3.0  # head, neck (the teacher's split)
    out[ok, 6:NUM_COARSE] = 0.0

    def rel(x: np.ndarray) -> np.ndarray:  # less the video's rest value
        return x - np.nanpercentile(x[ok], 10)

    p = points[..., :2]
    gap = np.linalg.norm(p[:, 13] - p[:, 14], axis=1) / height
    width = np.linalg.norm(p[:, 61] - p[:, 291], axis=1) / height
    brow = (np.linalg.norm(p[:, 105] - p[:, 159], axis=1)
            + np.linalg.norm(p[:, 334] - p[:, 386], axis=1)) / (2 * height)  # fmt: skip
    c = CALIBRATION
    out[:, FEATURES.index("jawOpen")] = np.clip(rel(gap) / c["jawOpen"], 0, 1)
    smile = np.clip((width - np.nanmedian(width[ok])) / c["mouthSmile"] + 0.1, 0, 1)
    out[:, FEATURES.index("mouthSmileLeft")] = out[:, FEATURES.index("mouthSmileRight")] = smile
    out[:, FEATURES.index("browInnerUp")] = np.clip(rel(brow) / c["browInnerUp"], 0, 1)
    yaw, pitch = [], []
    for iris, (outer, inner), (top, bottom) in ((468, (33, 133), (159, 145)),
                                                 (473, (263, 362), (386, 374))):  # fmt: skip
        span = p[:, inner, 0] - p[:, outer, 0]
        yaw.append((p[:, iris, 0] - (p[:, outer, 0] + p[:, inner, 0]) / 2) / np.abs(span))
        lid = np.abs(p[:, bottom, 1] - p[:, top, 1]) + 1e-6
        pitch.append(((p[:, top, 1] + p[:, bottom, 1]) / 2 - p[:, iris, 1]) / lid)
    # image right is the person's left (+yaw); up in the image is up
    out[:, FEATURES.index("gazeYaw")] = np.mean(yaw, 0) / c["gazeYaw"]
    out[:, FEATURES.index("gazePitch")] = np.mean(pitch, 0) / c["gazePitch"]
    return out


def track_face(video: str | Path) -> tuple[np.ndarray, float]:
    """[T, 478, 3] face-mesh points of every frame (NaN without a face) and the video's fps."""
    from avatar.evaluate import read_frames, video_fps
    from reconstruct.parsing import FaceMesh

    rows = []
    with FaceMesh(still=False) as mesh:
        for rgb in tqdm(read_frames(video), desc=Path(video).name, unit="frame"):
            found = mesh(rgb, depth=True)
            rows.append(np.full((478, 3), np.nan) if found is None else found)
    return np.stack(rows) if rows else np.zeros((0, 478, 3)), video_fps(video)


def resample(x: np.ndarray, fps: float, num: int) -> np.ndarray:
    """[T, F] at `fps` -> [num, F] at FPS (linear; gaps without a face filled)."""
    t_src, t_dst = (np.arange(len(x)) + 0.5) / fps, (np.arange(num) + 0.5) / FPS
    out = np.zeros((num, x.shape[1]), np.float32)
    for k in range(x.shape[1]):
        ok = np.isfinite(x[:, k])
        out[:, k] = np.interp(t_dst, t_src[ok], x[ok, k]) if ok.any() else 0.0
    return out


def extract(video: str | Path, channel: str | None = None, speaker: int | None = None) -> dict:
    """The training clip of one video: own / partner samples, their speech probabilities and
    the person's motion features [T, F] at FPS."""
    points, fps = track_face(video)
    if not np.isfinite(points).all((1, 2)).any():
        raise ValueError(f"{video}: no face found in any frame")
    motion = face_features(points)
    num = int(len(points) / fps * FPS)
    x = resample(motion, fps, num)
    if channel:
        left, right = stereo_channels(video)
        own, partner = (left, right) if channel == "left" else (right, left)
    else:
        from deform.speakers import diarize, speaker_tracks

        mixed = load_audio(video).samples
        first, second = speaker_tracks(mixed, diarize(mixed))
        if speaker is None:  # whose turns open the person's mouth more
            jaw = x[:, FEATURES.index("jawOpen")]
            opening = [jaw[speech_probability(s, num, FPS) >= 0.5].mean() for s in (first, second)]
            speaker = 1 if np.nan_to_num(opening[0]) >= np.nan_to_num(opening[1]) else 2
        own, partner = (first, second) if speaker == 1 else (second, first)
    return {"own": own, "partner": partner, "own_prob": speech_probability(own, num, FPS),
            "partner_prob": speech_probability(partner, num, FPS), "x": x}  # fmt: skip


def save_clip(path: Path, clip: dict, source: str) -> None:
    from safetensors.numpy import save_file

    from render.io import atomic_path

    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in clip.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={"fps": str(FPS), "source": source,
                                              "features": json.dumps(list(FEATURES))})  # fmt: skip


def load_clips(folder: str | Path) -> list[dict]:
    """The clips `extract_motion` wrote into `folder`; ValueError naming a file that is not
    one."""
    from safetensors.numpy import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no clips (.safetensors from python -m distill.extract_motion)")
    out = []
    for f in files:
        try:
            clip = load_file(str(f))
            assert {"own", "partner", "own_prob", "partner_prob", "x"} <= set(clip)
            assert clip["x"].shape == (len(clip["own_prob"]), len(FEATURES))
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
            raise ValueError(f"{f}: not a clip of distill.extract_motion ({exc})") from None
        out.append(clip)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.extract_motion",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("videos", nargs="+", help="videos of one person on camera, both voices heard")
    p.add_argument("--out", required=True, type=Path, help="a folder for the clips")
    p.add_argument("--channel", choices=("left", "right"), help="the person's channel of a "
                   "stereo sound track (else the track is split into its speakers)")  # fmt: skip
    p.add_argument("--speaker", type=int, choices=(1, 2), help="in a mixed track, the person on "
                   "camera (1 speaks first; default: whose turns open the mouth more)")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for video in args.videos:
        try:
            clip = extract(video, args.channel, args.speaker)
        except (ValueError, AudioError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        out = args.out / f"{Path(video).stem}.safetensors"
        save_clip(out, clip, str(video))
        print(f"wrote {out} ({len(clip['x']) / FPS:.1f} s; own voice {clip['own_prob'].mean():.0%}"
              f" of the time, partner {clip['partner_prob'].mean():.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
