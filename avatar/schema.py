"""What an avatar file may hold: one schema, checked before anything else reads the avatar.

Avatars are shared, so opening one treats it as untrusted input. It is four files of data
(JSON, PLY, safetensors), each read with a size cap and checked here, field by field and tensor
by tensor; every error names the file and the field. Nothing in an avatar names a file to load,
a module to import or code to run: the body template's files come only from the user's own
command line (`--body smplx:PATH`), and motion weights load only into a deformer whose
architecture comes from the toolkit (or the user's `--deformer`), key for key.

Limits (environment variables raise them for big GPU avatars):
`GSAVATAR_MAX_GAUSSIANS` (default 5,000,000) and `GSAVATAR_MAX_AVATAR_MB` (2048, the four
files together, uncompressed).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from reconstruct.canonical import PART_CODES
from render import Cameras

from .errors import AvatarError

FORMAT = "gsavatar"
VERSION = 2  # 2: the template is recorded by kind only (1 stored "smplx:PATH")
FILES = ("avatar.json", "gaussians.ply", "binding.safetensors", "deformer.safetensors")
TEMPLATE_KINDS = ("anny", "smplx")
MAX_JSON_BYTES = 4 << 20
MAX_SIDE = 16384  # camera width / height
MAX_BONES = 1024
MAX_SHAPE = 1024  # shape parameters


class AvatarFileError(AvatarError):
    """An avatar that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Limits:
    gaussians: int
    bytes: int

    @staticmethod
    def from_env() -> Limits:
        def read(name: str, default: int) -> int:
            text = os.environ.get(name, "").strip()
            if not text:
                return default
            if not text.isdigit() or int(text) < 1:
                raise AvatarError(f"${name}={text!r}: must be a positive whole number")
            return int(text)

        return Limits(read("GSAVATAR_MAX_GAUSSIANS", 5_000_000),
                      read("GSAVATAR_MAX_AVATAR_MB", 2048) << 20)  # fmt: skip


# ---- avatar.json -------------------------------------------------------------------------------
@dataclass
class AvatarDoc:
    """avatar.json, validated."""

    version: int
    template: str  # a kind from TEMPLATE_KINDS, never a path
    shape: list[float]
    camera: Cameras
    gaussians: int  # count
    bones: int  # count
    meta: dict  # "provenance" and "quality", free-form JSON objects (never acted on)


class _Fields:
    """Typed access to a JSON document by dotted path; errors say which field is wrong."""

    def __init__(self, doc, where: str) -> None:
        self.doc, self.where = doc, where

    def error(self, path: str, problem: str) -> AvatarFileError:
        return AvatarFileError(f"{self.where}: field '{path}' {problem}")

    def get(self, path: str, required: bool = True):
        node, keys = self.doc, path.split(".")
        for i, key in enumerate(keys):
            if not isinstance(node, dict):
                raise self.error(".".join(keys[:i]), f"must be an object, not {_kind(node)}")
            if key not in node:
                if not required:
                    return None
                raise self.error(".".join(keys[: i + 1]), "is missing")
            node = node[key]
        return node

    def integer(self, path: str, lo: int, hi: int) -> int:
        v = self.get(path)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.error(path, f"must be a whole number, not {_kind(v)}")
        if not lo <= v <= hi:
            raise self.error(path, f"must be in [{lo}, {hi}], not {v}")
        return v

    def string(self, path: str) -> str:
        v = self.get(path)
        if not isinstance(v, str):
            raise self.error(path, f"must be a string, not {_kind(v)}")
        return v

    def numbers(self, path: str, max_len: int, value=None) -> list[float]:
        v = self.get(path) if value is None else value
        if not isinstance(v, list) or len(v) > max_len:
            raise self.error(path, f"must be a list of at most {max_len} numbers, not {_kind(v)}")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
            raise self.error(path, "must hold numbers only")
        if not all(math.isfinite(x) for x in v):
            raise self.error(path, "holds NaN or infinite values")
        return [float(x) for x in v]

    def matrix(self, path: str, rows: int, cols: int) -> Tensor:
        v = self.get(path)
        if (
            not isinstance(v, list)
            or len(v) != rows
            or not all(isinstance(r, list) and len(r) == cols for r in v)
        ):
            raise self.error(path, f"must be a {rows}x{cols} array of numbers")
        return torch.tensor([self.numbers(path, cols, r) for r in v], dtype=torch.float32)

    def obj(self, path: str) -> dict:
        v = self.get(path, required=False)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.error(path, f"must be an object, not {_kind(v)}")
        return v


def _kind(v) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             int: "a number", float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(v), type(v).__name__)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_avatar_json(raw: bytes, where: str, limits: Limits) -> AvatarDoc:
    if len(raw) > MAX_JSON_BYTES:
        raise AvatarFileError(
            f"{where}: {len(raw)} bytes, over the {MAX_JSON_BYTES >> 20} MB limit"
        )
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AvatarFileError(f"{where}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise AvatarFileError(f"{where}: must hold a JSON object, not {_kind(doc)}")
    f = _Fields(doc, where)
    if f.get("format", required=False) != FORMAT:
        raise AvatarFileError(f"{where}: not a {FORMAT} avatar (field 'format' is not {FORMAT!r})")
    version = f.integer("version", 1, 1 << 30)
    if version > VERSION:
        raise AvatarFileError(f"{where}: format version {version} is newer than this toolkit "
                              f"reads ({VERSION}); upgrade gsavatar")  # fmt: skip
    if version == 1:  # "anny" or "smplx:PATH"; the path is never used
        kind = f.string("template.name").split(":", 1)[0]
    else:
        kind = f.string("template.kind")
    if kind not in TEMPLATE_KINDS:
        raise f.error("template", f"names an unknown body template {kind[:40]!r} "
                                  f"(known: {', '.join(TEMPLATE_KINDS)})")  # fmt: skip
    shape = f.numbers("template.shape", MAX_SHAPE)
    viewmat = f.matrix("camera.viewmat", 4, 4)
    if not torch.equal(viewmat[3], torch.tensor([0.0, 0.0, 0.0, 1.0])):
        raise f.error("camera.viewmat", "must end with the row [0, 0, 0, 1]")
    rot = viewmat[:3, :3]
    if (rot @ rot.T - torch.eye(3)).abs().max() > 1e-3:
        raise f.error("camera.viewmat", "must hold a rotation (orthonormal 3x3 block)")
    K = f.matrix("camera.K", 3, 3)
    if not (K[0, 0] > 0 and K[1, 1] > 0 and torch.equal(K[2], torch.tensor([0.0, 0.0, 1.0]))):
        raise f.error("camera.K", "must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
    width = f.integer("camera.width", 1, MAX_SIDE)
    height = f.integer("camera.height", 1, MAX_SIDE)
    gaussians = f.integer("counts.gaussians", 1, limits.gaussians)
    bones = f.integer("counts.bones", 1, MAX_BONES)
    meta = {k: f.obj(k) for k in ("provenance", "quality") if k in doc}
    return AvatarDoc(version, kind, shape, Cameras(viewmat[None], K[None], width, height),
                     gaussians, bones, meta)  # fmt: skip


# ---- tensors -----------------------------------------------------------------------------------
class Spec(NamedTuple):
    dtype: torch.dtype
    dims: str  # letters or numbers, e.g. "N 3": N is bound by the first tensor that shows it
    below: str = ""  # an index tensor: every value in [0, size of this letter)
    range: tuple[float, float] | None = None  # a float tensor: every value in [lo, hi]


# N Gaussians, K bones and P particles per Gaussian, J bones, S shape parameters, M particles,
# E Gaussians in the open eyes
BINDING = {
    "binding.face_ids": Spec(torch.int64, "N", "F"),
    "binding.bary": Spec(torch.float32, "N 3", range=(-1.0, 2.0)),
    "binding.bone_ids": Spec(torch.int64, "N K", "J"),
    "binding.bone_weights": Spec(torch.float32, "N K", range=(0.0, 1.0)),
    "binding.parts": Spec(torch.uint8, "N"),
    "photo.pose": Spec(torch.float32, "J 3", range=(-50.0, 50.0)),  # axis-angle, radians
    "photo.translation": Spec(torch.float32, "3", range=(-1e4, 1e4)),  # metres
    "template.shape": Spec(torch.float32, "S"),  # its range is the template's
}
PARTICLES = {  # optional, all or none (an avatar without them gets the template's)
    "particle.rest": Spec(torch.float32, "M 3", range=(-100.0, 100.0)),
    "particle.parts": Spec(torch.uint8, "M"),
    "particle.ids": Spec(torch.int64, "N P", "M"),
    "particle.weights": Spec(torch.float32, "N P", range=(0.0, 1.0)),
}
EYES = {  # optional, all or none: the blink's eye cover (`deform.eyes`; drive finds it if absent)
    "eyes.ids": Spec(torch.int64, "E", "N"),
    "eyes.height": Spec(torch.float32, "E", range=(-10.0, 10.0)),
    "eyes.lid_rgb": Spec(torch.float32, "E 3", range=(-1.0, 2.0)),
}
MAX_SIZES = {"K": 32, "P": 32, "M": 65536}  # more is no avatar this toolkit makes (8, 4, 512)


def check_tensors(tensors: dict[str, Tensor], spec: dict[str, Spec], sizes: dict[str, int],
                  where: str) -> None:  # fmt: skip
    """Each tensor of `spec` present with its dtype and shape (letters bind to sizes, which may
    be given), finite, and index tensors within range. `sizes` gains the letters bound here."""
    for name, (dtype, dims, below, bounds) in spec.items():
        if name not in tensors:
            raise AvatarFileError(f"{where}: tensor '{name}' is missing")
        t = tensors[name]
        if t.dtype != dtype:
            raise AvatarFileError(f"{where}: tensor '{name}' is {str(t.dtype)[6:]}, "
                                  f"expected {str(dtype)[6:]}")  # fmt: skip
        want = dims.split()
        if t.dim() != len(want):
            raise AvatarFileError(f"{where}: tensor '{name}' has shape {list(t.shape)}, "
                                  f"expected [{', '.join(want)}]")  # fmt: skip
        for size, d in zip(t.shape, want, strict=True):
            expected = int(d) if d.isdigit() else sizes.setdefault(d, size)
            if size != expected:
                raise AvatarFileError(f"{where}: tensor '{name}' has shape {list(t.shape)}, "
                                      f"expected {d}={expected} in dimension {want.index(d)}")  # fmt: skip
            if size > MAX_SIZES.get(d, size):
                raise AvatarFileError(f"{where}: tensor '{name}' has {d}={size}, at most "
                                      f"{MAX_SIZES[d]} are allowed")  # fmt: skip
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AvatarFileError(f"{where}: tensor '{name}' holds NaN or infinite values")
        if bounds and t.numel() and (t.min() < bounds[0] or t.max() > bounds[1]):
            raise AvatarFileError(f"{where}: tensor '{name}' holds values outside "
                                  f"[{bounds[0]:g}, {bounds[1]:g}]")  # fmt: skip
        if below and t.numel() and (t.min() < 0 or (below in sizes and t.max() >= sizes[below])):
            bound = f"[0, {sizes[below]})" if below in sizes else "non-negative values"
            raise AvatarFileError(f"{where}: tensor '{name}' holds indices outside {bound}")


def check_binding(tensors: dict[str, Tensor], sizes: dict[str, int], where: str) -> None:
    """binding.safetensors: the binding, photo pose and shape, and the particles and the eye
    cover if present."""
    extra = sorted(set(tensors) - set(BINDING) - set(PARTICLES) - set(EYES))
    if extra:
        raise AvatarFileError(f"{where}: unexpected tensor '{extra[0]}'")
    check_tensors(tensors, BINDING, sizes, where)
    for optional in (PARTICLES, EYES):
        if any(k in tensors for k in optional):
            check_tensors(tensors, optional, sizes, where)
    for name in ("binding.parts", "particle.parts"):
        if (
            name in tensors
            and not torch.isin(
                tensors[name], torch.tensor(list(PART_CODES.values()), dtype=torch.uint8)
            ).all()
        ):
            raise AvatarFileError(f"{where}: tensor '{name}' holds unknown part codes")
    for name in ("binding.bone_weights", "particle.weights"):
        if name in tensors and ((tensors[name].sum(-1) - 1).abs() > 1e-3).any():
            raise AvatarFileError(f"{where}: tensor '{name}' rows must sum to 1")


def check_weights(tensors: dict[str, Tensor], where: str) -> None:
    """deformer.safetensors: float32 and finite (which keys and shapes, the deformer decides)."""
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise AvatarFileError(
                f"{where}: tensor '{name}' is {str(t.dtype)[6:]}, expected float32"
            )
        if not torch.isfinite(t).all():
            raise AvatarFileError(f"{where}: tensor '{name}' holds NaN or infinite values")
