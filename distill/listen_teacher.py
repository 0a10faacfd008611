"""The listening teacher: what an avatar's head, face and eyes do in a conversation.

From the two tracks' speech probabilities (`deform.voice.speech_probability`) and the partner's
audio, per video frame, the motion features of `deform.conversation.FEATURES`:

- **While the avatar speaks** (its own track's probability m): the speech teacher's head, neck,
  chest and face (`distill.teacher.teach` on its own voice) smoothed over 0.3 s (the syllables
  are the speech deformer's job), eyes mostly on the partner with glances away every 2.5-6 s
  (0.5-1.2 s long, 9-17° to a side).
- **While it listens** (1 − m): the mouth closed; a nod (`deform.conversation.nod_curve`,
  0.07-0.13 rad) 0.25-0.6 s after most of the partner's phrase ends (`deform.voice.phrases`),
  sometimes a second, smaller one right after; smaller nods and brow
  raises on some of the partner's pitch accents; a backchannel smile after half the phrase
  ends; the head tilted a little and swaying slowly; slow posture shifts of the chest; eyes on
  the partner with small drifts. (Blinks, faster while listening, are `controls.blinks`.)

The two are mixed by m, so turn overlaps and the avatar's own backchannels ("mm-hm": its own
track speaks, the mouth moves) are handled frame by frame. `dialogue` makes training
conversations with espeak-ng: turns of `distill.phones.SENTENCES` in two voices, overlaps,
pauses, mutual silences and backchannels. Everything is deterministic under `seed`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from deform.audio import SAMPLE_RATE, load_audio
from deform.controls import BLINK_ACTIONS, PARTICLE_ACTIONS, TEMPLATE_ACTIONS
from deform.conversation import (
    COARSE_BONES,
    FEATURES,
    NOD_FALL_S,
    NOD_RISE_S,
    NUM_COARSE,
    ease_bump,
    nod_curve,
    nod_vector,
)
from deform.voice import phrases

from .converse_measures import FOLLOWED, MIRRORED
from .teacher import RATE, TeacherConfig, frame_features, onsets, smooth, teach

NAMES = SimpleNamespace(expression_names=[*TEMPLATE_ACTIONS, *PARTICLE_ACTIONS, *BLINK_ACTIONS])
BACKCHANNELS = ("mm-hm", "yeah", "right", "okay", "uh-huh", "I see", "sure")


def _noise(num: int, rng: np.random.Generator, period_frames: float) -> np.ndarray:
    sigma = period_frames / 6
    x = smooth(rng.standard_normal(num + int(6 * sigma) + 2), sigma)[:num]
    return x / (x.std() + 1e-9)


def speaking_features(samples: np.ndarray, num: int, fps: float, seed: int) -> np.ndarray:
    """[T, F] the speech teacher's head, neck, chest and face for the avatar's own voice."""
    c = teach(NAMES, samples, num, None, TeacherConfig(fps=fps, seed=seed))
    out = np.zeros((num, len(FEATURES)), np.float32)
    out[:, :NUM_COARSE] = c.bones[:, : len(COARSE_BONES)].reshape(num, -1).numpy()
    ids = [NAMES.expression_names.index(a) for a in TEMPLATE_ACTIONS]
    out[:, NUM_COARSE : NUM_COARSE + len(TEMPLATE_ACTIONS)] = c.actions[:, ids].numpy()
    return out


def listening_features(own_prob: np.ndarray, partner_prob: np.ndarray, partner: np.ndarray,
                       fps: float, seed: int) -> tuple[np.ndarray, list[tuple[float, float]]]:  # fmt: skip
    """[T, F] listening motion, and the nods it placed: (onset seconds, amplitude radians)."""
    rng = np.random.default_rng(seed)
    num = len(own_prob)
    t = np.arange(num) / fps
    listen = 1 - smooth(np.asarray(own_prob, np.float64), 0.15 * fps).clip(0, 1)
    f = {name: np.zeros(num) for name in FEATURES}
    nods, smile, brow, events = np.zeros(num), np.zeros(num), np.zeros(num), []
    for _, end in phrases(partner_prob, fps):
        e = end / fps
        if rng.uniform() < 0.85:
            onset = e + rng.uniform(0.25, 0.6)
            i = min(int(onset * fps), num - 1)
            if listen[i] > 0.5:
                amp = rng.uniform(0.07, 0.13)
                events.append((onset, amp))
                if rng.uniform() < 0.3:  # now and then a second, smaller nod
                    events.append((onset + NOD_RISE_S + NOD_FALL_S, 0.6 * amp))
        if rng.uniform() < 0.5:
            smile += rng.uniform(0.15, 0.3) * ease_bump(t - e - rng.uniform(0.2, 0.5), 0.3, 1.5)
    # the partner's pitch accents: small nods and brow raises
    loud, _, pitch = frame_features(partner, int(np.ceil(num / fps * RATE)) + 1)
    for idx, strength in onsets(loud, pitch):
        a = idx / RATE + 0.3
        if strength > 0.9 and rng.uniform() < 0.35:
            nods += 0.04 * ease_bump(t - a, 0.15, 0.25)
        if strength > 0.9 and rng.uniform() < 0.2:
            brow += 0.2 * ease_bump(t - a, 0.15, 0.5)
    for onset, amp in events:
        nods += amp * nod_curve(t - onset)
    f["head.x"] = nods + 0.02 * _noise(num, rng, 8 * fps)
    f["head.y"] = 0.04 * _noise(num, rng, 6 * fps)
    f["head.z"] = 0.03 + 0.03 * _noise(num, rng, 7 * fps)  # a listener's tilt
    for a in "xyz":
        f[f"neck02.{a}"] = 0.5 * f[f"head.{a}"]
    breath = np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 2 * np.pi))
    f["spine02.x"] = 0.02 * _noise(num, rng, 12 * fps) - 0.012 * breath
    f["spine02.z"] = 0.015 * _noise(num, rng, 15 * fps)
    f["mouthSmileLeft"] = f["mouthSmileRight"] = np.clip(
        0.1 + 0.04 * _noise(num, rng, 8 * fps) + smile, 0, 1
    )
    f["browInnerUp"] = brow
    f["gazeYaw"] = 0.03 * _noise(num, rng, 3 * fps)
    f["gazePitch"] = 0.02 * _noise(num, rng, 3 * fps)
    return np.stack([f[n] for n in FEATURES], -1).astype(np.float32), events


def gaze_aversions(num: int, fps: float, seed: int) -> np.ndarray:
    """[T, 2] a speaker's glances away from the partner (yaw, pitch radians)."""
    rng = np.random.default_rng(seed + 7919)
    t, out, at = np.arange(num) / fps, np.zeros((num, 2)), rng.uniform(1.0, 4.0)
    while at < num / fps:
        length = rng.uniform(0.5, 1.2)
        side = rng.choice([-1.0, 1.0])
        shape = ease_bump(t - at, 0.15, length)
        out += shape[:, None] * np.array([side * rng.uniform(0.15, 0.3), rng.uniform(-0.1, 0.15)])
        at += length + rng.uniform(2.5, 6.0)
    return out


@dataclass
class TeacherMotion:
    x: np.ndarray  # [T, F] the motion
    nods: np.ndarray  # [T, F] the nods' share of it (x − nods: the slow head)
    events: list[tuple[float, float]]  # the nods: (onset seconds, amplitude radians)


def conversation_features(own: np.ndarray, partner: np.ndarray, own_prob: np.ndarray,
                          partner_prob: np.ndarray, fps: float, seed: int) -> TeacherMotion:  # fmt: skip
    """The teacher's motion for the avatar whose voice is `own` (16 kHz) in a conversation
    with `partner`; T = len(own_prob)."""
    num = len(own_prob)
    # while it talks, the video shows the speech deformer's motion (made from the own voice,
    # which this model never hears): it learns the slow part only (a 0.3 s smoothing takes out
    # the syllable nods and the jaw's syllables), what it needs to hand over between turns
    speak = smooth(speaking_features(own, num, fps, seed), 0.3 * fps)
    speak[:, FEATURES.index("gazeYaw") :] = gaze_aversions(num, fps, seed)
    listen, events = listening_features(own_prob, partner_prob, partner, fps, seed)
    m = smooth(np.asarray(own_prob, np.float64), 0.1 * fps).clip(0, 1)[:, None]
    t = np.arange(num) / fps
    lift = sum((a * nod_curve(t - onset) for onset, a in events), np.zeros(num))
    nods = (1 - m) * lift[:, None] * nod_vector().numpy()[None]
    return TeacherMotion((m * speak + (1 - m) * listen).astype(np.float32),
                         nods.astype(np.float32), events)  # fmt: skip


# what a listener takes from its partner's motion, not its voice (the two streams'
# cross-attention has to learn it: `ConverseModel.step_pair`):
# - posture mirroring (the chameleon effect): the speaker's slow head and chest posture,
#   mirrored as people facing each other do (pitch alike, roll opposite), about 0.8 s later;
# - gaze following (joint attention): when the speaker glances away, the listener's eyes follow
#   toward the same spot (yaw opposite in its own frame), 0.4 s later and not as far.
# (features, gain, lag s, smoothing s); the smoothing's reach (3σ) stays inside the lag
TAKEN = ((MIRRORED, 0.7, 0.8, 0.15), (FOLLOWED, 0.6, 0.4, 0.04))


def mirrored(x: np.ndarray, partner_x: np.ndarray, own_prob: np.ndarray,
             partner_prob: np.ndarray, fps: float) -> np.ndarray:  # fmt: skip
    """`x` [T, F] with the partner's posture and glances (`partner_x`, its motion) taken up
    (`TAKEN`) while this avatar listens and the partner speaks; frame t uses the partner's
    motion of frames before t only."""
    listening = 1 - smooth(np.asarray(own_prob, np.float64), 0.1 * fps).clip(0, 1)
    speaking = smooth(np.asarray(partner_prob, np.float64), 0.1 * fps).clip(0, 1)
    out = np.array(x, np.float32)
    for features, gain, lag_s, smooth_s in TAKEN:
        lag = int(round(lag_s * fps))
        slow = smooth(np.asarray(partner_x, np.float64), smooth_s * fps)
        late = np.concatenate([np.repeat(slow[:1], lag, 0), slow[: len(slow) - lag]])
        for name, sign in features.items():
            i = FEATURES.index(name)
            out[:, i] += (gain * sign * listening * speaking * late[:, i]).astype(np.float32)
    return out


def conversation_pair(a: np.ndarray, b: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray,
                      fps: float, seeds: tuple[int, int], seeing: bool = True,
                      ) -> tuple[TeacherMotion, TeacherMotion]:  # fmt: skip
    """Both sides of one conversation (`conversation_features` for each voice); `seeing`: each
    listener also takes up the other's posture and glances (`mirrored`)."""
    one = conversation_features(a, b, prob_a, prob_b, fps, seeds[0])
    two = conversation_features(b, a, prob_b, prob_a, fps, seeds[1])
    if not seeing:
        return one, two
    return (TeacherMotion(mirrored(one.x, two.x, prob_a, prob_b, fps), one.nods, one.events),
            TeacherMotion(mirrored(two.x, one.x, prob_b, prob_a, fps), two.nods, two.events))  # fmt: skip


# ---- training conversations ----------------------------------------------------------------------
def dialogue(seed: int, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic two-person conversation (espeak-ng): the two voices' 16 kHz tracks, the same
    length. Turns of 1-3 sentences, gaps from −0.3 s (overlap) to 0.9 s, now and then a mutual
    silence of 1.5-3 s, and the listener's backchannels in the speaker's pauses."""
    from .phones import _VARIANTS, synthesize_speech

    rng = np.random.default_rng(seed)
    voices = rng.choice(_VARIANTS, 2, replace=False)
    speeds, pitches = rng.integers(135, 185, 2), rng.integers(30, 75, 2)
    pieces: list[tuple[int, float, np.ndarray]] = []  # (speaker, start s, samples)
    with tempfile.TemporaryDirectory() as tmp:

        def say(who: int, text: str) -> np.ndarray:
            wav = Path(tmp) / f"{len(pieces)}.wav"
            synthesize_speech(text, wav, f"en-us+{voices[who]}", int(speeds[who]),
                              int(pitches[who]))  # fmt: skip
            return load_audio(wav).samples

        now, who = 0.3 + rng.uniform(0, 0.7), int(rng.integers(2))
        for _ in range(int(rng.integers(4, 8))):
            count = int(rng.integers(1, 4))
            for k in range(count):
                speech = say(who, sentences[int(rng.integers(len(sentences)))])
                pieces.append((who, now, speech))
                now += len(speech) / SAMPLE_RATE
                if k < count - 1:
                    pause = rng.uniform(0.25, 0.6)
                    if rng.uniform() < 0.3:  # the listener backchannels in the pause
                        word = BACKCHANNELS[int(rng.integers(len(BACKCHANNELS)))]
                        pieces.append((1 - who, now + rng.uniform(0.05, 0.25), say(1 - who, word)))
                    now += pause
            now += rng.uniform(1.5, 3.0) if rng.uniform() < 0.15 else rng.uniform(-0.3, 0.9)
            now = max(now, 0.0)
            who = 1 - who
    total = int((now + 0.5) * SAMPLE_RATE)
    tracks = np.zeros((2, total + SAMPLE_RATE * 4), np.float32)
    for speaker, start, samples in pieces:
        a = int(start * SAMPLE_RATE)
        tracks[speaker, a : a + len(samples)] += samples
    end = max(int(s * SAMPLE_RATE) + len(x) for _, s, x in pieces) + SAMPLE_RATE // 2
    return tracks[0, :end].clip(-1, 1), tracks[1, :end].clip(-1, 1)
