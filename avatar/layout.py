"""Where two avatars stand, from a sentence: an offline text -> layout step.

A small set of annotated layouts (each: a distance between the two bodies, how far each turns
from the camera toward the other, and phrases people use for it). The text is matched to the
phrases by word and word-pair overlap (the fraction of a phrase's words and pairs the text
holds, the best phrase per layout; a tie goes to the more specific layout, listed first), so
"facing each other across a table" is the table layout (its "across a table" and the facing
layout's "facing each other" both match fully). A distance in the text ("1.5 m", "two metres",
"3 feet", "a metre apart") overrides the layout's own; so do Hall's proxemic zones ("intimate",
"close", "personal", "social", "public"). No network and no language model: the whole table is
below, and `layout_from_text` says which phrase it matched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import AvatarError


@dataclass(frozen=True)
class Layout:
    name: str
    distance: float  # metres between the two bodies' centres
    turn_deg: float  # each body turns this far from the camera toward the other
    phrases: tuple[str, ...]


LAYOUTS = (  # the most specific first: a tie goes to the earlier layout
    Layout("across-a-table", 1.3, 75.0, ("across a table", "at a table", "over a desk",
                                         "across the desk", "at dinner", "in a cafe",
                                         "across a counter")),
    Layout("facing", 1.1, 90.0, ("facing each other", "face to face", "opposite each other",
                                 "in profile", "across from each other", "head on")),
    Layout("side-by-side", 0.7, 15.0, ("side by side", "next to each other", "beside each other",
                                       "shoulder to shoulder", "together on a sofa",
                                       "in a row", "facing the camera")),
    Layout("at-an-angle", 1.0, 45.0, ("at an angle", "angled towards each other",
                                      "turned towards each other", "in a v", "diagonal",
                                      "three quarter view", "chatting")),
)  # fmt: skip
ZONES = {"intimate": 0.45, "close": 0.6, "personal": 0.9, "social": 1.6, "public": 3.0}
NUMBERS = {"half a": 0.5, "a": 1.0, "one": 1.0, "two": 2.0, "three": 3.0, "four": 4.0,
           "five": 5.0, "one and a half": 1.5}  # fmt: skip
UNITS = {"m": 1.0, "metre": 1.0, "metres": 1.0, "meter": 1.0, "meters": 1.0, "cm": 0.01,
         "centimetres": 0.01, "centimeters": 0.01, "foot": 0.3048, "feet": 0.3048, "ft": 0.3048,
         "yard": 0.9144, "yards": 0.9144, "step": 0.7, "steps": 0.7}  # fmt: skip
DISTANCE_RANGE = (0.4, 4.0)


@dataclass(frozen=True)
class Placement:
    """One avatar in the scene: position on the ground (x, z), facing (yaw about +Y, degrees;
    0 faces the camera at +Z)."""

    x: float
    z: float
    yaw_deg: float


@dataclass(frozen=True)
class SceneLayout:
    layout: Layout
    distance: float
    matched: str  # the phrase (or "default") that chose the layout
    placements: tuple[Placement, Placement]  # the first avatar on the left of the two-shot


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower().replace("-", " "))


def _score(text_words: list[str], phrase: str) -> float:
    words = phrase.split()
    pairs = set(zip(words, words[1:], strict=False))
    have, have_pairs = set(text_words), set(zip(text_words, text_words[1:], strict=False))
    hit = sum(w in have for w in words) + sum(p in have_pairs for p in pairs)
    return hit / (len(words) + len(pairs)) + 0.01 * len(words)  # longer full matches win


def parse_distance(text: str) -> float | None:
    """A distance the text names, metres; None if it names none."""
    t = text.lower().replace("-", " ")
    units = "|".join(sorted(map(re.escape, UNITS), key=len, reverse=True))
    m = re.search(rf"(\d+(?:\.\d+)?)\s*({units})\b", t)
    if m:
        return float(m.group(1)) * UNITS[m.group(2)]
    words = "|".join(sorted(map(re.escape, NUMBERS), key=len, reverse=True))
    m = re.search(rf"\b({words})\s+({units})\b", t)
    if m:
        return NUMBERS[m.group(1)] * UNITS[m.group(2)]
    for zone, metres in ZONES.items():
        if re.search(rf"\b{zone}\b", t):
            return metres
    return None


def layout_from_text(text: str | None) -> SceneLayout:
    """The layout a sentence describes (at an angle when it names none)."""
    words = _words(text or "")
    best, matched, score = LAYOUTS[-1], "default", 0.5  # a layout needs half a phrase at least
    for layout in LAYOUTS:
        for phrase in layout.phrases:
            s = _score(words, phrase)
            if s > score:
                best, matched, score = layout, phrase, s
    distance = parse_distance(text or "") or best.distance
    lo, hi = DISTANCE_RANGE
    if not lo <= distance <= hi:
        raise AvatarError(f"--layout {text!r}: {distance:.2f} m apart is outside "
                          f"{lo}-{hi} m (two people in one conversation)")  # fmt: skip
    half = distance / 2
    a = Placement(-half, 0.0, best.turn_deg)  # on the left (−X), turned toward +X
    b = Placement(half, 0.0, -best.turn_deg)
    return SceneLayout(best, distance, matched, (a, b))


def toward(me: Placement, other: tuple[float, float, float], head: tuple[float, float, float]
           ) -> tuple[float, float]:  # fmt: skip
    """(yaw, pitch) in radians, in `me`'s body frame, from its head to the point `other`
    (world coordinates); `head` is its head's world position."""
    dx, dy, dz = (o - h for o, h in zip(other, head, strict=True))
    yaw_world = math.atan2(dx, dz)  # 0: straight to +Z; positive toward +X
    yaw = yaw_world - math.radians(me.yaw_deg)
    yaw = (yaw + math.pi) % (2 * math.pi) - math.pi
    return yaw, math.atan2(dy, math.hypot(dx, dz))
