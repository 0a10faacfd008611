"""Measures of conversational motion, from the motion features (`deform.conversation.FEATURES`)
and the tracks' speech probabilities; never from the signal that made the motion alone.

- **Reaction delay**: nod onsets (the head pitching down at ≥ `NOD_SPEED` rad/s after a calm
  moment) against the partner's phrase ends (`deform.voice.phrases`); each phrase end's first
  onset within 1.5 s, while the avatar listens.
- **Alive**: the head's angular speed while listening over while speaking; the longest time the
  head stays under `FROZEN_SPEED` rad/s while listening.
- **FD**: Fréchet distance between Gaussians fitted to the generated and the reference listening
  frames (features and their per-second velocities), as DualTalk and Learning2Listen compute it.
- **SID**: k-means (k = 40) on the reference frames, then the entropy (bits) of the generated
  frames' cluster histogram: how many distinct motions it uses.
- **Mirroring and gaze following**: while the avatar listens, the correlation of its slow head
  and chest posture (pitch alike, roll opposite: people facing each other), or of its gaze
  (yaw opposite: the same spot seen from the other side), with its partner's a lag earlier, at
  lags 0-2 s: its peak and where it is. Two avatars that see each other's motion should show
  it; two that only hear each other should not.
"""

from __future__ import annotations

import numpy as np

from deform.conversation import FEATURES
from deform.voice import phrases

NOD_SPEED = 0.25  # rad/s of head pitch: a nod's downward stroke (still heads sway at < 0.1)
FROZEN_SPEED = 0.02  # rad/s
HEAD = slice(0, 3)  # head.x .. head.z


def roles(own_prob: np.ndarray, partner_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the frames where only the avatar speaks, and where only its partner does."""
    own, other = np.asarray(own_prob) >= 0.5, np.asarray(partner_prob) >= 0.5
    return own & ~other, other & ~own


def head_speed(x: np.ndarray, fps: float) -> np.ndarray:
    """[T] angular speed (rad/s) of the head bone's rotation delta (small angles)."""
    v = np.diff(x[:, HEAD], axis=0, prepend=x[:1, HEAD]) * fps
    return np.linalg.norm(v, axis=1)


def nod_onsets(x: np.ndarray, fps: float) -> np.ndarray:
    """Frames where a nod starts: head pitch speed crosses NOD_SPEED upward (down is +x)."""
    pitch_speed = np.gradient(x[:, 0]) * fps
    fast = pitch_speed >= NOD_SPEED
    return np.flatnonzero(fast & ~np.r_[False, fast[:-1]])


def reaction_delays(x: np.ndarray, own_prob: np.ndarray, partner_prob: np.ndarray,
                    fps: float) -> list[float]:  # fmt: skip
    """Seconds from each partner phrase end (the avatar listening) to the first nod onset
    within 1.5 s; phrase ends without a nod are left out (`nod_rate` counts them)."""
    onsets, own = nod_onsets(x, fps), np.asarray(own_prob)
    out = []
    for _, end in phrases(partner_prob, fps):
        if end >= len(own) or own[end : end + int(0.5 * fps)].mean() >= 0.5:
            continue  # the avatar takes the turn: no listener's nod expected
        later = onsets[(onsets >= end) & (onsets <= end + 1.5 * fps)]
        if len(later):
            out.append(float((later[0] - end) / fps))
    return out


def longest_still(speed: np.ndarray, mask: np.ndarray, fps: float) -> float:
    """Longest run (s) of `mask` frames with the head under FROZEN_SPEED."""
    still = (speed < FROZEN_SPEED) & mask
    best = run = 0
    for s in still:
        run = run + 1 if s else 0
        best = max(best, run)
    return best / fps


def motion_frames(x: np.ndarray, mask: np.ndarray, fps: float) -> np.ndarray:
    """[n, 2F] the `mask` frames' features and velocities (per second)."""
    v = np.gradient(x, axis=0) * fps
    return np.concatenate([x, v], 1)[mask]


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and b."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def kmeans(x: np.ndarray, k: int = 40, iters: int = 50, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means (k-means++ start): the [k, D] centres."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], 0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[0])
    c = np.array(centres)
    for _ in range(iters):
        label = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[label == j].mean(0) if (label == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c


def sid(x: np.ndarray, centres: np.ndarray) -> float:
    """Entropy (bits) of the histogram of x's nearest centres."""
    label = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    p = np.bincount(label, minlength=len(centres)) / len(label)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


MIRRORED = {"head.x": 1.0, "head.z": -1.0, "spine02.x": 1.0, "spine02.z": -1.0}  # posture
FOLLOWED = {"gazeYaw": -1.0, "gazePitch": 1.0}  # where the partner looks


def mirroring(x: np.ndarray, partner_x: np.ndarray, own_prob: np.ndarray,
              partner_prob: np.ndarray, fps: float, features: dict = MIRRORED,
              max_lag_s: float = 2.0) -> dict:  # fmt: skip
    """Pearson correlation, over the frames where this avatar listens, of each of `features`
    with the partner's (times its sign) `lag` frames earlier, averaged over the features; its
    peak over lags 0..max_lag_s and the lag (s) of the peak."""
    listen = roles(own_prob, partner_prob)[1]
    best, at = -1.0, 0.0
    for lag in range(int(max_lag_s * fps) + 1):
        frames = np.flatnonzero(listen[lag:]) + lag
        if len(frames) < 2 * fps:
            continue
        cors = []
        for name, sign in features.items():
            i = FEATURES.index(name)
            a, b = x[frames, i], sign * partner_x[frames - lag, i]
            if a.std() > 1e-9 and b.std() > 1e-9:
                cors.append(np.corrcoef(a, b)[0, 1])
        if cors and np.mean(cors) > best:
            best, at = float(np.mean(cors)), lag / fps
    return {"peak": best, "lag_s": at}


def summary(x: np.ndarray, own_prob: np.ndarray, partner_prob: np.ndarray, fps: float) -> dict:
    """The per-clip figures of a generated motion [T, F]."""
    talk, listen = roles(own_prob, partner_prob)
    speed = head_speed(x, fps)
    jaw = x[:, FEATURES.index("jawOpen")]
    delays = reaction_delays(x, own_prob, partner_prob, fps)
    ends = [e for _, e in phrases(partner_prob, fps)]
    mean = lambda v, m: float(v[m].mean()) if m.any() else float("nan")  # noqa: E731
    return {
        "speaking_s": float(talk.sum() / fps), "listening_s": float(listen.sum() / fps),
        "jaw_listening_over_speaking": mean(jaw, listen) / max(mean(jaw, talk), 1e-9),
        "head_speed_speaking": mean(speed, talk), "head_speed_listening": mean(speed, listen),
        "head_speed_ratio": mean(speed, listen) / max(mean(speed, talk), 1e-9),
        "longest_still_listening_s": longest_still(speed, listen, fps),
        "reaction_delays_s": delays,
        "reaction_delay_median_s": float(np.median(delays)) if delays else float("nan"),
        "nodded_phrase_ends": f"{len(delays)}/{len(ends)}",
    }  # fmt: skip
