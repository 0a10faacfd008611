"""The procedural speech teacher: audio (+ transcript) -> template controls per video frame.

- **Visemes.** Phones with timings (pocketsphinx forced alignment to the transcript,
  `distill.phones`) become weights on the template's ARKit facial actions: `mouthClose` and
  `mouthPress` for p, b, m; `mouthFunnel` / `mouthPucker` for rounded vowels; `mouthStretch` and
  smiles for spread vowels; `jawOpen` from each phone's openness and the loudness.
  Coarticulation: the tracks are smoothed across neighbouring phones (a Gaussian of 35 ms, with
  the mouth anticipating the sound by 30 ms); closures keep a tighter 15 ms so lips still meet.
- **Without a usable transcript** the same tracks come from the audio itself: openness from the
  band-passed loudness, rounding from a low spectral centroid, closures at short loudness dips
  between syllables.
- **Prosody.** Syllable onsets (rising edges of loudness) weighted by loudness and pitch become
  head nods and brow raises; slow seeded noise turns and tilts the head more while speaking.
- **Beat gestures.** Stressed onsets trigger forearm and wrist beats, alternating hands.
- **Blinks and breathing.** `deform.controls.blinks` and a 0.25 Hz chest rise.

Everything is deterministic under `seed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from deform.audio import SAMPLE_RATE
from deform.audio_features import band_loudness
from deform.controls import BLINK_ACTIONS, DRIVEN_BONES, VISEME_LIPS, Controls, blinks

log = logging.getLogger(__name__)

RATE = 100  # Hz, internal track rate

# ARPAbet -> (openness, round, spread, closure); openness drives jawOpen
VOWELS = {
    "AA": (0.75, 0.0, 0.1, 0), "AE": (0.6, 0.0, 0.4, 0), "AH": (0.5, 0.0, 0.1, 0),
    "AO": (0.6, 0.5, 0.0, 0), "AW": (0.6, 0.4, 0.0, 0), "AY": (0.6, 0.0, 0.3, 0),
    "EH": (0.45, 0.0, 0.4, 0), "ER": (0.3, 0.4, 0.0, 0), "EY": (0.4, 0.0, 0.5, 0),
    "IH": (0.3, 0.0, 0.5, 0), "IY": (0.2, 0.0, 0.7, 0), "OW": (0.45, 0.7, 0.0, 0),
    "OY": (0.5, 0.5, 0.1, 0), "UH": (0.3, 0.6, 0.0, 0), "UW": (0.2, 0.9, 0.0, 0),
}  # fmt: skip
CONSONANTS = {
    "P": (0.0, 0.0, 0.0, 1), "B": (0.0, 0.0, 0.0, 1), "M": (0.0, 0.0, 0.0, 1),
    "F": (0.1, 0.0, 0.1, 0), "V": (0.1, 0.0, 0.1, 0), "W": (0.15, 0.9, 0.0, 0),
    "R": (0.2, 0.5, 0.0, 0), "SH": (0.15, 0.6, 0.0, 0), "ZH": (0.15, 0.6, 0.0, 0),
    "CH": (0.15, 0.5, 0.0, 0), "JH": (0.15, 0.5, 0.0, 0), "TH": (0.2, 0.0, 0.1, 0),
    "DH": (0.2, 0.0, 0.1, 0), "S": (0.1, 0.0, 0.4, 0), "Z": (0.1, 0.0, 0.4, 0),
    "Y": (0.15, 0.0, 0.5, 0),
}  # fmt: skip
OTHER = (0.2, 0.0, 0.1, 0)  # T D N L K G NG HH ...


@dataclass(frozen=True)
class TeacherConfig:
    fps: float = 25.0
    seed: int = 0
    head_amplitude: float = 1.0  # scales nods, turns and tilts
    gesture_amplitude: float = 1.0  # scales arm and hand beats


# ---- signal analysis -----------------------------------------------------------------------------
def frame_features(samples: np.ndarray, num: int, rate: float = RATE):
    """Per-track-frame loudness (300-3000 Hz RMS), spectral centroid and pitch (0 if unvoiced)."""
    loud = np.nan_to_num(band_loudness(samples, rate, 0, num))
    hop = SAMPLE_RATE / rate
    win = 640
    centroid, pitch = np.zeros(num), np.zeros(num)
    freqs = np.fft.rfftfreq(win, 1 / SAMPLE_RATE)
    lags = np.arange(SAMPLE_RATE // 400, SAMPLE_RATE // 70)
    for i in range(num):
        c = int(i * hop + hop / 2)
        seg = samples[max(0, c - win // 2) : c + win // 2]
        if len(seg) < win:
            seg = np.pad(seg, (0, win - len(seg)))
        mag = np.abs(np.fft.rfft(seg * np.hanning(win)))
        centroid[i] = (mag * freqs).sum() / (mag.sum() + 1e-9)
        seg = seg - seg.mean()
        ac = np.correlate(seg, seg, "full")[win - 1 :]
        if ac[0] > 1e-8:
            k = lags[np.argmax(ac[lags])]
            if ac[k] / ac[0] > 0.4:
                pitch[i] = SAMPLE_RATE / k
    return loud, centroid, pitch


def smooth(x: np.ndarray, sigma_frames: float, shift: float = 0.0) -> np.ndarray:
    """Gaussian smoothing along the first axis; positive `shift` moves the curve earlier."""
    if sigma_frames <= 0:
        return x
    r = int(3 * sigma_frames + abs(shift)) + 1
    k = np.exp(-0.5 * ((np.arange(-r, r + 1) + shift) / sigma_frames) ** 2)
    k /= k.sum()
    pad = np.pad(x, [(r, r)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    return np.apply_along_axis(lambda c: np.convolve(c, k[::-1], "valid"), 0, pad)


def resample(track: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    t_src = (np.arange(len(track)) + 0.5) / RATE
    t_dst = (np.arange(num_frames) + 0.5) / fps
    if track.ndim == 1:
        return np.interp(t_dst, t_src, track)
    return np.stack([np.interp(t_dst, t_src, c) for c in track.T], -1)


# ---- the teacher --------------------------------------------------------------------------------
def mouth_tracks(phones, loud: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """[R, 4] openness, round, spread, closure at RATE Hz, from phones or (None) from audio."""
    num = len(loud)
    ref = np.percentile(loud, 95) + 1e-9
    level = np.clip(loud / ref, 0, 1.3)
    raw = np.zeros((num, 4))
    if phones is not None:
        for ph in phones:
            a, b = int(round(ph.start * RATE)), int(round(ph.end * RATE))
            raw[a:b] = VOWELS.get(ph.label) or CONSONANTS.get(ph.label) or (
                (0, 0, 0, 0) if ph.label == "SIL" else OTHER)  # fmt: skip
        raw[:, 0] *= 0.3 + 0.9 * np.clip(level, 0, 1)
    else:  # loudness and spectral cues
        speech = level > 0.12
        raw[:, 0] = 0.7 * np.clip(level, 0, 1) ** 0.8
        raw[:, 1] = speech * np.clip((1600 - centroid) / 1200, 0, 1) * 0.7
        raw[:, 2] = speech * np.clip((centroid - 2200) / 1500, 0, 1) * 0.5
        dip = (level < 0.15) & (smooth(level, 6) > 0.3)  # short gaps inside speech
        raw[:, 3] = dip
    out = smooth(raw, 3.5, shift=3.0)  # 35 ms coarticulation, 30 ms anticipation
    out[:, 3] = np.clip(smooth(raw[:, 3], 1.5, shift=3.0) * 1.3, 0, 1)
    return out


def onsets(loud: np.ndarray, pitch: np.ndarray) -> list[tuple[int, float]]:
    """Syllable onsets (index at RATE Hz, strength in [0, 1]) from rising loudness."""
    ref = np.percentile(loud, 95) + 1e-9
    env = smooth(np.clip(loud / ref, 0, 1.3), 2.0)
    rise = np.diff(env, prepend=env[0])
    voiced_pitch = pitch[pitch > 0]
    p_ref = np.median(voiced_pitch) if len(voiced_pitch) else 1.0
    out, last = [], -100
    for i in range(1, len(env) - 1):
        if rise[i] > 0.02 and rise[i] >= rise[i - 1] and rise[i] >= rise[i + 1] and i - last > 15:
            peak = env[i : i + 15].max()
            accent = 1.0 + (0.5 * (pitch[i : i + 15].max() / p_ref - 1) if p_ref > 1 else 0)
            out.append((i, float(np.clip(peak * accent, 0, 1.5))))
            last = i
    return out


def pulse(num: int, events, tau: float, rise: float = 0.06) -> np.ndarray:
    """Sum of smooth attack-decay pulses (attack `rise` s, decay `tau` s) at event indices."""
    t = np.arange(num) / RATE
    out = np.zeros(num)
    for idx, amp in events:
        dt = t - idx / RATE
        attack = np.exp(-0.5 * (dt / rise) ** 2)
        out += amp * np.where(dt < 0, attack, np.exp(-dt / tau))
    return out


def slow_noise(num: int, rng: np.random.Generator, period_s: float = 3.0) -> np.ndarray:
    """Smooth noise with unit standard deviation and a typical period of `period_s`."""
    sigma = period_s * RATE / 6
    x = smooth(rng.standard_normal(num + int(6 * sigma)), sigma)[:num]
    return x / (x.std() + 1e-9)


def teach(template, samples: np.ndarray, num_frames: int, phones=None,
          cfg: TeacherConfig = TeacherConfig()) -> Controls:  # fmt: skip
    """Template controls for `num_frames` video frames of `samples` (16 kHz mono)."""
    rng = np.random.default_rng(cfg.seed)
    num = int(np.ceil(num_frames / cfg.fps * RATE)) + 1
    loud, centroid, pitch = frame_features(samples, num)
    mouth = mouth_tracks(phones, loud, centroid)
    ref = np.percentile(loud, 95) + 1e-9
    speaking = smooth((loud / ref > 0.12).astype(float), 30)  # slow speech activity

    names = template.expression_names
    actions = np.zeros((num, len(names)))

    def put(name: str, values: np.ndarray, most: float = 1.0) -> None:
        actions[:, names.index(name)] = np.clip(values, 0, most)

    opening, rounding, spread, closure = mouth.T
    put("jawOpen", 1.2 * opening * (1 - 0.8 * closure))
    # the fine lip shapes: the visemes of deform.controls, mixed by the phone tracks
    strength = {"open": opening, "round": rounding, "spread": spread, "closed": closure}
    for viseme, lips in VISEME_LIPS.items():
        for action, w in lips.items():
            put(action, np.clip(strength[viseme], 0, 1) * w, most=w)
    smile = 0.12 + 0.08 * slow_noise(num, rng, 8.0)
    put("mouthSmileLeft", smile + 0.25 * spread)
    put("mouthSmileRight", smile + 0.25 * spread)

    events = onsets(loud, pitch)
    nods = pulse(num, events, tau=0.25)
    put("browInnerUp", 0.35 * pulse(num, [(i, a) for i, a in events if a > 0.8], tau=0.35))

    # bones: axis-angle deltas in each bone's rest frame (canonical axes: +X = left, +Y up, +Z
    # front); a positive X rotation tips the head forward (a nod down)
    bones = np.zeros((num, len(DRIVEN_BONES), 3))
    b = {name: i for i, name in enumerate(DRIVEN_BONES)}
    h = cfg.head_amplitude
    turn = (0.35 + 0.65 * speaking) * slow_noise(num, rng, 4.0)
    tilt = (0.35 + 0.65 * speaking) * slow_noise(num, rng, 5.0)
    nod_bias = 0.5 * slow_noise(num, rng, 6.0)
    bones[:, b["head"]] = h * np.stack(
        [0.06 * nods + 0.02 * nod_bias, 0.06 * turn, 0.035 * tilt], -1
    )
    bones[:, b["neck02"]] = 0.5 * bones[:, b["head"]]
    breath = np.sin(2 * np.pi * 0.25 * np.arange(num) / RATE + rng.uniform(0, 2 * np.pi))
    bones[:, b["spine02"], 0] = -0.012 * breath + 0.02 * h * nods

    # beats: alternate hands on strong onsets, sometimes both
    g = cfg.gesture_amplitude
    beat = {"L": [], "R": []}
    side = "L" if rng.uniform() < 0.5 else "R"
    for i, a in events:
        if a < 0.5:
            continue
        beat[side].append((i, a))
        if rng.uniform() < 0.25:
            beat["R" if side == "L" else "L"].append((i, 0.6 * a))
        if rng.uniform() < 0.6:
            side = "R" if side == "L" else "L"
    for s, sign in (("L", 1.0), ("R", -1.0)):
        p = pulse(num, beat[s], tau=0.35, rise=0.08)
        hold = speaking * (0.5 + 0.5 * slow_noise(num, rng, 6.0).clip(-1, 1))
        lift = g * (0.25 * hold + 0.35 * p)  # forearm comes up and forward
        bones[:, b[f"lowerarm01.{s}"]] = np.stack([-lift, 0.15 * sign * lift, 0 * lift], -1)
        bones[:, b[f"upperarm01.{s}"]] = np.stack([-0.3 * lift, 0 * lift, 0.1 * sign * lift], -1)
        bones[:, b[f"wrist.{s}"]] = g * np.stack([-0.25 * p, 0.3 * sign * p, 0.1 * p], -1)
        bones[:, b[f"clavicle.{s}"], 2] = g * sign * 0.03 * p

    actions = resample(actions, num_frames, cfg.fps)
    bones = resample(bones.reshape(num, -1), num_frames, cfg.fps).reshape(num_frames, -1, 3)
    blink = blinks(num_frames, cfg.fps, seed=cfg.seed)
    for name in BLINK_ACTIONS:
        actions[:, names.index(name)] = blink
    return Controls(torch.from_numpy(bones).float(), torch.from_numpy(actions).float())


def phones_for(samples: np.ndarray, transcript: str | None):
    """Forced-aligned phones, or None (the audio-cue fallback) without a usable transcript."""
    if not transcript or not transcript.strip():
        return None
    from .phones import AlignmentError, align_phones

    try:
        return align_phones(samples, transcript)
    except AlignmentError as exc:
        log.warning("transcript not usable (%s); visemes from the audio alone", exc)
        return None
