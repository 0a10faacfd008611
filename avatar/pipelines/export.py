"""The export pipeline: an avatar -> files other tools open.

    splat    the Gaussians in the antimatter15 `.splat` layout (web splat viewers; SH degree 0)
    ply      the standard 3DGS PLY (desktop splat viewers, SuperSplat, Blender add-ons)
    glb      the fitted template mesh in its rest pose, its skeleton and skin weights, with vertex
             colours from the Gaussians (Blender, Unity, three.js: pose it there)
    ply-seq  with speech: one PLY of posed Gaussians per frame and `frames.json` with each
             frame's time (a 4D sequence for offline renderers)

`pose` picks which Gaussians splat and ply hold: "rest" (the canonical ones, as in the avatar's
own gaussians.ply), "body" (the photo's pose, upright in the body frame: what `avatar render`
orbits) or "photo" (the photo's pose where the photo's camera saw it). Everything is in the
project's conventions (metres, +Y up, facing +Z), which are glTF's too. Every output is written
atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from deform.templates import BodyTemplate
from render.io import atomic_path, ply_bytes, save_splat
from render.sh import sh0_to_rgb

from ..asset import Avatar
from ..errors import AvatarError
from .create import posed_gaussians
from .drive import DriveConfig, Driver, speech_frames

FORMATS = ("splat", "ply", "glb", "ply-seq")
POSES = ("rest", "body", "photo")


@dataclass(frozen=True)
class ExportConfig:
    format: str = ""
    """splat, ply, glb, or ply-seq (one PLY per frame; needs --audio); empty: from the
    output's suffix (.splat, .ply, .glb; none: ply-seq)."""
    pose: str = "body"
    """splat / ply: rest (canonical), body (the photo's pose, upright) or photo (where the
    photo's camera saw it)."""
    fps: float = 25.0
    """ply-seq: frames per second."""
    seed: int = 0
    """ply-seq: seed of the blinks."""


def export_avatar(avatar: Avatar, out_path: str | Path, cfg: ExportConfig = ExportConfig(),
                  audio: str | Path | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Write `out_path` in `cfg.format`; returns a summary (what was written, counts)."""
    out = Path(out_path)
    if not cfg.format:
        by_suffix = {".splat": "splat", ".ply": "ply", ".glb": "glb", "": "ply-seq"}
        if out.suffix.lower() not in by_suffix:
            raise AvatarError(f"{out}: unknown output type {out.suffix!r}; use .splat, .ply, "
                              ".glb, or a folder name for a PLY sequence")  # fmt: skip
        cfg = replace(cfg, format=by_suffix[out.suffix.lower()])
    if cfg.format not in FORMATS:
        raise AvatarError(f"--format {cfg.format}: use one of {', '.join(FORMATS)}")
    if cfg.pose not in POSES:
        raise AvatarError(f"--pose {cfg.pose}: use one of {', '.join(POSES)}")
    suffix = {"splat": ".splat", "ply": ".ply", "glb": ".glb"}.get(cfg.format, "")
    if out.suffix.lower() != suffix:
        raise AvatarError(f"{out}: --format {cfg.format} writes "
                          + (f"a {suffix} file" if suffix else "a folder (a name without a suffix)"))  # fmt: skip
    if cfg.format == "ply-seq" and audio is None:
        raise AvatarError("--format ply-seq needs --audio, the speech that drives the sequence")
    if cfg.format != "ply-seq" and audio is not None:
        raise AvatarError(f"--audio goes with --format ply-seq only, not {cfg.format}")
    if cfg.format == "ply-seq":
        return _ply_sequence(avatar, audio, out, cfg, progress)
    template = avatar.body_template()
    if cfg.format == "glb":
        data, counts = glb_bytes(avatar, template)
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        return {"format": "glb", **counts}
    g = posed_gaussians(avatar, template, cfg.pose)
    if cfg.format == "splat":
        if g.sh is None:
            raise AvatarError(f"{out}: this avatar's Gaussians carry features, not colours, "
                              "which .splat cannot hold: export ply")  # fmt: skip
        save_splat(g, out)
    else:
        with atomic_path(out) as tmp:
            tmp.write_bytes(ply_bytes(g))
    return {"format": cfg.format, "pose": cfg.pose, "gaussians": len(g)}


def _ply_sequence(avatar: Avatar, audio_path, out: Path, cfg: ExportConfig, progress: bool) -> dict:
    from tqdm import tqdm

    audio, num = speech_frames(audio_path, cfg.fps)
    # posed on the CPU: the frames go straight to the PLY writer
    driver = Driver(avatar, DriveConfig(fps=cfg.fps, seed=cfg.seed, device="cpu"))
    frames = []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        bar = tqdm(total=num, unit="frame", desc="ply-seq", disable=not progress)
        with bar:
            for i, g in enumerate(driver.posed(audio.samples, num)):
                name = f"frame_{i:05d}.ply"
                (tmp / name).write_bytes(ply_bytes(g))
                frames.append({"index": i, "time_s": round(i / cfg.fps, 6), "file": name})
                bar.update(1)
        doc = {"fps": cfg.fps, "audio": Path(audio_path).name,
               "audio_s": round(audio.duration_s, 3), "gaussians": len(avatar.gaussians),
               "frame": "body (upright; +Y up, facing +Z, metres)", "frames": frames}  # fmt: skip
        (tmp / "frames.json").write_text(json.dumps(doc, indent=1))
    return {"format": "ply-seq", "frames": len(frames), "fps": cfg.fps,
            "gaussians": len(avatar.gaussians)}  # fmt: skip


# ---- glTF binary ---------------------------------------------------------------------------------


def vertex_colours(avatar: Avatar, template: BodyTemplate) -> np.ndarray:
    """[V, 3] float in [0, 1]: each vertex's colour as the mean of the Gaussians bound to its
    triangles (weighted by barycentric weight and opacity); vertices no Gaussian covers take
    their covered neighbours' mean."""
    g, b = avatar.gaussians, avatar.binding
    if g.sh is None:
        raise AvatarError("this avatar's Gaussians carry features, not colours: export ply")
    rgb = sh0_to_rgb(g.sh[:, 0].detach().float()).clamp(0, 1)
    w = b.bary.float() * g.opacities.detach().float()[:, None]  # [N, 3]
    verts = template.faces[b.face_ids]  # [N, 3]
    V = template.num_vertices
    total = torch.zeros(V).index_add_(0, verts.reshape(-1), w.reshape(-1))
    colour = torch.zeros(V, 3).index_add_(0, verts.reshape(-1),
                                          (w[..., None] * rgb[:, None]).reshape(-1, 3))  # fmt: skip
    covered = total > 1e-6
    colour[covered] /= total[covered, None]
    edges = torch.cat([template.faces[:, [0, 1]], template.faces[:, [1, 2]],
                       template.faces[:, [2, 0]]]).T  # fmt: skip
    edges = torch.cat([edges, edges.flip(0)], 1)  # both directions
    for _ in range(64):  # grow the coloured region one ring at a time
        if covered.all():
            break
        src, dst = edges[:, covered[edges[0]] & ~covered[edges[1]]]
        if len(src) == 0:
            break
        count = torch.zeros(V).index_add_(0, dst, torch.ones(len(dst)))
        grown = torch.zeros(V, 3).index_add_(0, dst, colour[src])
        new = count > 0
        colour[new] = grown[new] / count[new, None]
        covered |= new
    colour[~covered] = 0.5
    return colour.numpy()


def glb_bytes(avatar: Avatar, template: BodyTemplate) -> tuple[bytes, dict]:
    """The fitted template as one skinned glTF 2.0 binary: mesh in the rest pose (the avatar's
    shape), one joint node per bone at its rest head (translation only, so a joint turns about
    its head as Anny's bones do), skin weights in groups of four (largest first), vertex colours (linear, as glTF
    wants)."""
    with torch.no_grad():
        rest = template(avatar.shape[None].float())
    pos = rest.rest_vertices[0].float().numpy()
    heads = rest.joints[0].float().numpy()
    faces = template.faces.numpy().astype(np.uint32)
    normals = _vertex_normals(pos, faces)
    colours = srgb_to_linear(vertex_colours(avatar, template)).astype(np.float32)  # glTF: linear
    parents = template.bone_parents
    J, K = len(parents), template.skin_ids.shape[1]
    sets = (K + 3) // 4
    ids = np.zeros((len(pos), 4 * sets), np.uint16 if J > 255 else np.uint8)
    weights = np.zeros((len(pos), 4 * sets), np.float32)
    order = np.argsort(-template.skin_weights.numpy(), 1, kind="stable")  # largest first: a
    w = np.take_along_axis(template.skin_weights.numpy(), order, 1)  # 4-influence reader
    ids[:, :K] = np.where(w > 0, np.take_along_axis(template.skin_ids.numpy(), order, 1), 0)
    weights[:, :K] = w / np.maximum(w.sum(1, keepdims=True), 1e-12)  # (three.js) keeps the main
    inverse_bind = np.tile(np.eye(4, dtype=np.float32), (J, 1, 1))
    inverse_bind[:, :3, 3] = -heads
    writer = _GlbWriter()
    attributes = {
        "POSITION": writer.accessor(pos, "VEC3", bounds=True),
        "NORMAL": writer.accessor(normals, "VEC3"),
        "COLOR_0": writer.accessor(colours, "VEC3"),
    }
    for s in range(sets):
        attributes[f"JOINTS_{s}"] = writer.accessor(ids[:, 4 * s : 4 * s + 4], "VEC4")
        attributes[f"WEIGHTS_{s}"] = writer.accessor(weights[:, 4 * s : 4 * s + 4], "VEC4")
    indices = writer.accessor(faces.reshape(-1), "SCALAR", target=34963)
    ibm = writer.accessor(inverse_bind.transpose(0, 2, 1).reshape(J, 16), "MAT4", target=None)
    nodes = []
    for j, (name, parent) in enumerate(zip(template.bone_names, parents, strict=True)):
        offset = heads[j] - (heads[parent] if parent >= 0 else 0)
        nodes.append({"name": name, "translation": [float(v) for v in offset]})
    for j, parent in enumerate(parents):
        if parent >= 0:
            nodes[parent].setdefault("children", []).append(j)
    roots = [j for j, p in enumerate(parents) if p < 0]
    nodes.append({"name": "body", "mesh": 0, "skin": 0})
    primitive = {"attributes": attributes, "indices": indices, "material": 0}
    material = {"name": "skin", "pbrMetallicRoughness": {"metallicFactor": 0.0,
                                                         "roughnessFactor": 0.9}}  # fmt: skip
    skin = {"name": "skeleton", "joints": list(range(J)), "skeleton": roots[0],
            "inverseBindMatrices": ibm}  # fmt: skip
    doc = {
        "asset": {"version": "2.0", "generator": "gsavatar export"},
        "scene": 0,
        "scenes": [{"name": "avatar", "nodes": [*roots, J]}],
        "nodes": nodes,
        "meshes": [{"name": "body", "primitives": [primitive]}],
        "materials": [material],
        "skins": [skin],
    }
    return writer.glb(doc), {"vertices": len(pos), "triangles": len(faces), "bones": J,
                             "skin_sets": sets}  # fmt: skip


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """Display (sRGB) colour values, as the Gaussians store them, to glTF's linear COLOR_0."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _vertex_normals(pos: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = pos[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    out = np.zeros_like(pos)
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.maximum(norm, 1e-12), [0.0, 1.0, 0.0]).astype(np.float32)


_COMPONENTS = {np.dtype(np.float32): 5126, np.dtype(np.uint32): 5125,
               np.dtype(np.uint16): 5123, np.dtype(np.uint8): 5121}  # fmt: skip


class _GlbWriter:
    """Accessors over one binary buffer, each view 4-byte aligned; `glb` packs the file."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def accessor(self, array: np.ndarray, kind: str, bounds: bool = False,
                 target: int | None = 34962) -> int:  # fmt: skip
        array = np.ascontiguousarray(array)
        view = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": array.nbytes}
        if target is not None:
            view["target"] = target
        self.blob += array.tobytes()
        self.blob += b"\0" * (-len(self.blob) % 4)
        self.views.append(view)
        acc = {"bufferView": len(self.views) - 1, "componentType": _COMPONENTS[array.dtype],
               "count": len(array), "type": kind}  # fmt: skip
        if bounds:
            acc["min"] = array.min(0).tolist()
            acc["max"] = array.max(0).tolist()
        self.accessors.append(acc)
        return len(self.accessors) - 1

    def glb(self, doc: dict) -> bytes:
        doc = {**doc, "buffers": [{"byteLength": len(self.blob)}], "bufferViews": self.views,
               "accessors": self.accessors}  # fmt: skip
        text = json.dumps(doc, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 4)
        length = 12 + 8 + len(text) + 8 + len(self.blob)
        header = np.array([0x46546C67, 2, length], "<u4").tobytes()  # "glTF", version 2
        json_chunk = np.array([len(text), 0x4E4F534A], "<u4").tobytes() + text  # "JSON"
        bin_chunk = np.array([len(self.blob), 0x004E4942], "<u4").tobytes() + bytes(self.blob)
        return header + json_chunk + bin_chunk
