"""Does the mouth articulate speech? Measured on a talking video's frames at spans of known
sounds, with MediaPipe's face mesh (the tracking mesh of `evaluate.mouth_track`), so the measure
shares no signal with what drove the mouth (loudness drives `jawOpen`; these look at shapes):

- **rounding**: the inner mouth's width (landmarks 78-308) over the face's height (10-152),
  mean over the middle half of each rounded vowel (/uw ow/: "sue", "two"), over the same on
  spread vowels (/iy ih/: "see", "tea"). Lips that pucker and spread give well under 1; a mouth
  that only opens and closes gives 1. Target ≤ 0.85.
- **closure**: for each /p b m/, the smallest inner-lip gap (13-14 over 10-152) inside it over
  the largest within `WORD_S` around it (its word), the median over them. Lips that meet give
  about 0. Target ≤ 0.15.
- **speaking over pause**: the mean inner-lip gap while speaking over the mean in pauses of at
  least `PAUSE_S`. Target ≥ 2.
- **lips crossing** (`LipGap`, from the posed Gaussians, not the frames): how far the lower lip
  comes up past the upper one beyond where they meet (at rest, less a photo's parted lips'
  painted gap), millimetres between the two lips' middles, the 95th percentile over the
  frames. MediaPipe's mesh reads a lower lip risen over the upper one as lips closed (closure
  about 0), and the frames showed its red over the upper lip, up to the nose. Target ≤ 3 mm
  (lips pressed, not passed through each other).

Spans come from phones (`distill.phones.align_phones` on a transcript) or, for speech made
word by word, from the words' own phones placed at known times (`word_spans`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ROUND, SPREAD, BILABIAL = ("UW", "OW"), ("IY", "IH"), ("P", "B", "M")
WORD_S = 0.2  # seconds each side of a closure that count as its word
PAUSE_S = 0.25  # a silence at least this long is a pause
TARGETS = {"rounding": 0.85, "closure": 0.15, "speaking_over_pause": 2.0, "lips_cross_mm": 3.0}


@dataclass(frozen=True)
class Span:
    label: str  # an ARPAbet phone, or "SIL"
    start: float  # seconds
    end: float


def frames_in(span: Span, fps: float, num: int, middle: bool = False) -> np.ndarray:
    """Indices of the frames whose centre lies in `span` (its middle half with `middle`)."""
    start, end = span.start, span.end
    if middle:
        quarter = (end - start) / 4
        start, end = start + quarter, end - quarter
    centres = (np.arange(num) + 0.5) / fps
    return np.nonzero((centres >= start) & (centres < end))[0]


def rounding(width: np.ndarray, spans: list[Span], fps: float) -> float:
    """Mean width on rounded over spread vowels (module docstring); NaN without both."""
    means = []
    for labels in (ROUND, SPREAD):
        idx = [frames_in(s, fps, len(width), middle=True) for s in spans if s.label in labels]
        values = width[np.concatenate(idx)] if idx else np.array([])
        values = values[np.isfinite(values)]
        means.append(values.mean() if len(values) else np.nan)
    return float(means[0] / means[1]) if means[1] > 0 else float("nan")


def closure(gap: np.ndarray, spans: list[Span], fps: float) -> float:
    """Median over bilabials of the smallest gap inside over the largest around (docstring)."""
    ratios = []
    for s in spans:
        if s.label not in BILABIAL:
            continue
        inside = gap[
            frames_in(Span(s.label, s.start - 0.5 / fps, s.end + 0.5 / fps), fps, len(gap))
        ]
        word = gap[frames_in(Span(s.label, s.start - WORD_S, s.end + WORD_S), fps, len(gap))]
        inside, word = inside[np.isfinite(inside)], word[np.isfinite(word)]
        if len(inside) and len(word) and word.max() > 0:
            ratios.append(inside.min() / word.max())
    return float(np.median(ratios)) if ratios else float("nan")


def speaking_over_pause(gap: np.ndarray, spans: list[Span], fps: float) -> float:
    """Mean gap over speech phones over the mean over pauses (docstring); NaN without both."""
    speech = [frames_in(s, fps, len(gap)) for s in spans if s.label != "SIL"]
    pause = [frames_in(s, fps, len(gap)) for s in spans
             if s.label == "SIL" and s.end - s.start >= PAUSE_S]  # fmt: skip
    if not speech or not pause:
        return float("nan")
    a, b = gap[np.concatenate(speech)], gap[np.concatenate(pause)]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b) or b.mean() <= 0:
        return float("nan")
    return float(a.mean() / b.mean())


def articulation(gap: np.ndarray, width: np.ndarray, spans: list[Span], fps: float) -> dict:
    """The three measures and whether each meets its target."""
    out = {
        "rounding": rounding(width, spans, fps),
        "closure": closure(gap, spans, fps),
        "speaking_over_pause": speaking_over_pause(gap, spans, fps),
        "round_vowels": sum(s.label in ROUND for s in spans),
        "spread_vowels": sum(s.label in SPREAD for s in spans),
        "bilabials": sum(s.label in BILABIAL for s in spans),
    }
    out["pass"] = {
        "rounding": bool(out["rounding"] <= TARGETS["rounding"]),
        "closure": bool(out["closure"] <= TARGETS["closure"]),
        "speaking_over_pause": bool(out["speaking_over_pause"] >= TARGETS["speaking_over_pause"]),
    }
    return out


class LipGap:
    """The distance between the lips' middles in a posed frame: the mean height of the upper lip's
    Gaussians in the mouth's middle over the lower lip's (`drive.lip_middles`), in metres;
    `rest`: where they look met, the rest less the gap `painted` on them (`drive.lips_at_rest`)."""

    def __init__(self, avatar, rig, painted: float = 0.0) -> None:
        from .pipelines.drive import lip_middles

        self.upper, self.lower = lip_middles(avatar, rig)
        with torch.no_grad():  # where they look met: a photo's parted lips, painted, closed
            self.rest = self(rig.still()) - painted

    def __call__(self, g) -> float:
        y = g.means[:, 1].cpu()
        return float(y[self.upper].mean() - y[self.lower].mean())


def lips_cross_mm(gaps: np.ndarray, rest: float) -> float:
    """How far the lower lip came up past the upper one beyond their rest (`LipGap` of each
    frame, `gaps` [T] metres): the 95th percentile over the frames of rest - gap, millimetres."""
    return float(np.percentile((rest - gaps) * 1000, 95))


def phone_spans(samples: np.ndarray, transcript: str) -> list[Span]:
    """Spans from forced alignment of `transcript` to 16 kHz `samples` (`align_phones`)."""
    from distill.phones import align_phones

    return [Span(p.label, p.start, p.end) for p in align_phones(samples, transcript)]


# ---- speech with known words: what the measures are run on --------------------------------------
# word -> the class of sound the measure reads in it (rounded, spread, or bilabial closures)
WORDS = {
    "round": ("sue", "two", "who", "shoe", "zoo", "food", "moon", "goose"),
    "spread": ("see", "tea", "he", "key", "seed", "cheese", "feet", "geese"),
    "bilabial": ("papa", "mama", "hobby", "baby", "maybe", "bob", "pop", "mop"),
}
LABEL = {"round": "UW", "spread": "IY", "bilabial": "P"}
GAP_S = 0.4  # seconds of silence between words (a pause)


def spoken_words(seed: int = 0, words_per_class: int = 4, speed: int = 150,
                 gap_s: float = GAP_S) -> tuple[np.ndarray, list[Span]]:  # fmt: skip
    """Speech made word by word with espeak-ng (a seeded voice), each word trimmed to its sound
    and joined with `gap_s` of silence: (16 kHz samples, spans). A word's span carries the class
    of sound in it (`LABEL`: UW, IY or P) and covers the whole word, silences are SIL. Different
    seeds pick other words, voices, speeds and orders."""
    import tempfile
    from pathlib import Path

    from deform.audio import SAMPLE_RATE, load_audio
    from distill.phones import synthesize_speech

    rng = np.random.default_rng(seed)
    chosen = [(LABEL[c], w) for c, ws in WORDS.items()
              for w in rng.choice(ws, size=min(words_per_class, len(ws)), replace=False)]  # fmt: skip
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    pieces, spans, at = [gap], [], len(gap) / SAMPLE_RATE
    spans.append(Span("SIL", 0.0, at))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, word) in enumerate(chosen):
            path = synthesize_speech(
                word, Path(tmp) / f"{i}.wav", speed=speed, seed=seed * 1000 + i
            )
            x = load_audio(path).samples
            loud = np.nonzero(np.abs(x) > 0.02 * np.abs(x).max())[0]
            x = x[loud[0] : loud[-1] + 1] if len(loud) else x
            pieces += [x, gap]
            spans.append(Span(label, at, at + len(x) / SAMPLE_RATE))
            at += len(x) / SAMPLE_RATE
            spans.append(Span("SIL", at, at + gap_s))
            at += gap_s
    return np.concatenate(pieces).astype(np.float32), spans


# ---- an avatar driven by known words, measured --------------------------------------------------
def arm_angles(body: np.ndarray, min_visibility: float = 0.5) -> np.ndarray:
    """[2] each upper arm's angle from the torso's side in the image, degrees (the person's
    left, right), from MediaPipe pose landmarks `body` [33, 3] (x, y px, visibility): at the
    shoulder, between elbow and hip. NaN where a landmark is not visible."""
    out = []
    for shoulder, elbow, hip in ((11, 13, 23), (12, 14, 24)):
        if body[[shoulder, elbow, hip], 2].min() < min_visibility:
            out.append(np.nan)
            continue
        a, b = body[elbow, :2] - body[shoulder, :2], body[hip, :2] - body[shoulder, :2]
        cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-9)
        out.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    return np.array(out)


def body_track(frames) -> np.ndarray:
    """MediaPipe pose (video mode) over RGB frames -> [T, 33, 3] (x, y px, visibility), NaN
    where no person is found."""
    import mediapipe as mp

    from reconstruct.parsing import _quiet_stderr

    out = []
    with _quiet_stderr():
        pose = mp.solutions.pose.Pose(static_image_mode=False, model_complexity=1)
    try:
        for rgb in frames:
            h, w = rgb.shape[:2]
            found = pose.process(np.ascontiguousarray(rgb)).pose_landmarks
            out.append(np.full((33, 3), np.nan) if found is None else
                       np.array([[p.x * w, p.y * h, p.visibility] for p in found.landmark]))  # fmt: skip
    finally:
        with _quiet_stderr():
            pose.close()
    return np.array(out).reshape(-1, 33, 3)


def speech_mask(spans: list[Span], fps: float, num: int) -> tuple[np.ndarray, np.ndarray]:
    """[T] bool masks of the frames in speech and in pauses (silences of at least PAUSE_S)."""
    speech, pause = np.zeros(num, bool), np.zeros(num, bool)
    for s in spans:
        if s.label != "SIL":
            speech[frames_in(s, fps, num)] = True
        elif s.end - s.start >= PAUSE_S:
            pause[frames_in(s, fps, num)] = True
    return speech, pause


def measure_avatar(avatar, seed: int = 0, size: int = 256, *, fps: float = 25.0,
                   photo_face: np.ndarray | None = None, particles: bool = True,
                   body: bool = True) -> dict:  # fmt: skip
    """Drive `avatar` with `spoken_words(seed)` and measure what a viewer sees: articulation in
    the face close-up (`articulation`), identity there against `photo_face` (the input photo's
    face, `views.photo_face`; SFace, every 5th frame),
    and the body in the full framing: the upper arms' median angle from the torso's side and
    the wrists' motion while speaking over their motion in pauses (MediaPipe pose; `body`)."""
    from deform.audio import SAMPLE_RATE

    from .evaluate import FaceIdentity, mouth_track
    from .pipelines.drive import DriveConfig, Driver, frame_count

    ident = FaceIdentity() if photo_face is not None else None
    ref = ident.embed(photo_face) if ident is not None else None
    if ident is not None and ref is None:
        from .evaluate import EvaluationError

        raise EvaluationError("SFace finds no face in the photo's face close-up")
    samples, spans = spoken_words(seed)
    num = frame_count(len(samples) / SAMPLE_RATE, fps)
    kept: list[np.ndarray] = []

    def keep_some(frames):
        for i, rgb in enumerate(frames):
            if i % 5 == 0:
                kept.append(rgb)
            yield rgb

    # on the CPU wherever it runs: the figures must not depend on the machine's GPU
    face = Driver(avatar, DriveConfig(size=size, fps=fps, framing="face", particles=particles,
                                      device="cpu"))  # fmt: skip
    lips, gaps = LipGap(avatar, face.rig, face.lips_gap), []
    track = mouth_track(keep_some(face.frames(samples, num, progress=False,
                                              seen=lambda g: gaps.append(lips(g)))))  # fmt: skip
    out = articulation(track["opening"], track["width"], spans, fps)
    out["lips_cross_mm"] = lips_cross_mm(np.array(gaps), lips.rest)
    out["pass"]["lips_cross"] = bool(out["lips_cross_mm"] <= TARGETS["lips_cross_mm"])
    if ident is not None:
        sims = [float(v @ ref) for v in map(ident.embed, kept) if v is not None]
        out["identity"] = float(np.mean(sims)) if sims else float("nan")
        out["pass"]["identity"] = bool(out["identity"] >= 0.6)
    if not body:
        return out
    full = Driver(avatar, DriveConfig(size=2 * size, fps=fps, framing="full", particles=particles,
                                      device="cpu"))  # fmt: skip
    body = body_track(full.frames(samples, num, progress=False))
    angles = np.array([arm_angles(b) for b in body])
    out["upper_arm_deg"] = [float(np.nanmedian(a)) if np.isfinite(a).any() else float("nan")
                            for a in angles.T]  # fmt: skip
    out["pass"]["relaxed_arms"] = bool(np.nanmax(out["upper_arm_deg"]) <= 25.0)
    wrists = body[:, [15, 16], :2]
    step = np.r_[np.nan, np.nanmean(np.linalg.norm(np.diff(wrists, axis=0), axis=-1), axis=-1)]
    speech, pause = speech_mask(spans, fps, num)
    out["wrist_speech_over_pause"] = float(
        np.nanmean(step[speech]) / max(np.nanmean(step[pause]), 1e-9)
    )
    out["pass"]["hands_talk"] = bool(out["wrist_speech_over_pause"] >= 2.0)
    return out
