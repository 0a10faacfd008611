"""The avatar asset: a folder (or a .zip of it) of safe files only, never pickle.

    avatar.json           format version, template kind and fitted shape, the photo's camera,
                          counts, provenance and quality figures
    gaussians.ply         the canonical (rest-pose) Gaussians, standard 3DGS layout
    binding.safetensors   how each Gaussian hangs on the template and on the deformer's
                          particles, the photo's pose, and the blink's eye cover
    deformer.safetensors  the avatar's own motion weights (empty: the shipped default is used)

Writes are atomic: a new folder or zip is written under a temporary name and swapped into place.
Reads treat the avatar as untrusted (`avatar.schema`): each file is read once, with a size
cap, from one open folder or zip (so a writer replacing the avatar meanwhile can never give the
reader a mix of old and new files), then checked before anything uses it.
"""

from __future__ import annotations

import json
import os
import stat
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from deform.eyes import EyeCover
from deform.particles import Particles
from deform.templates import BodyTemplate, load_template, template_kind
from deform.templates.baked import baked_anny
from reconstruct.canonical import Binding
from render import Cameras, Gaussians
from render.io import SplatFileError, parse_ply, ply_bytes

from .errors import AvatarError
from .media import atomic_path, check_output
from .schema import (
    FILES,
    FORMAT,
    VERSION,
    AvatarFileError,
    Limits,
    check_binding,
    check_weights,
    parse_avatar_json,
)

__all__ = ["Avatar", "AvatarFileError", "is_avatar_path"]


@dataclass
class Avatar:
    gaussians: Gaussians  # canonical (rest pose), N
    binding: Binding
    template: str  # the body template's kind: "anny" or "smplx" (never a path)
    shape: Tensor  # [S] fitted phenotype / betas
    photo_pose: Tensor  # [J, 3] the photo's pose, axis-angle per bone
    photo_translation: Tensor  # [3]
    camera: Cameras  # the input view (1 camera)
    meta: dict = field(default_factory=dict)  # provenance and quality figures
    deformer: dict[str, Tensor] = field(default_factory=dict)  # fine-tuned motion weights
    particles: Particles | None = None  # the deformer's particles (computed when absent)
    eyes: EyeCover | None = None  # the blink's eye cover (found from a render when absent)
    body: str = ""  # where the template's files are (the user's --body); never saved
    source: str = ""  # where this avatar was read from, for messages; never saved

    # ---- the body template -------------------------------------------------------------------
    def body_template(self) -> BodyTemplate:
        """The avatar's template, built from the toolkit (Anny, baked at the avatar's shape:
        `deform.templates.baked`) or the user's own files (`--body smplx:PATH`), and checked
        against the avatar's binding."""
        where = self.source or "the avatar"
        if self.template == "anny":
            from deform.templates.anny import DEFAULT_SHAPE, AnnyBase

            name = "anny"
            self._check_shape(name, len(DEFAULT_SHAPE), AnnyBase.shape_range)  # before baking it
            template = baked_anny(self.shape)
        elif not self.body:
            raise AvatarError(f"{where} is on the SMPL-X body template: pass your model file "
                              "with --body smplx:PATH (an avatar never names files to load)")  # fmt: skip
        else:
            name = self.body
            try:
                template = load_template(name)
            except ValueError as exc:
                raise AvatarError(f"--body {name}: {exc}") from None
            self._check_shape(name, len(template.shape_names), template.shape_range)
        b, where = self.binding, f"{where}/binding.safetensors"
        if len(self.photo_pose) != template.num_bones:
            raise AvatarFileError(f"{where}: {len(self.photo_pose)} bones do not fit the {name} "
                                  f"template's {template.num_bones}")  # fmt: skip
        if b.face_ids.max() >= len(template.faces):
            raise AvatarFileError(f"{where}: tensor 'binding.face_ids' holds indices outside "
                                  f"[0, {len(template.faces)}) (the {name} template's triangles)")  # fmt: skip
        return template

    def _check_shape(self, name: str, count: int, bounds: tuple[float, float]) -> None:
        where = f"{self.source or 'the avatar'}/binding.safetensors"
        if len(self.shape) != count:
            raise AvatarFileError(f"{where}: {len(self.shape)} shape parameters do not fit the "
                                  f"{name} template's {count}")  # fmt: skip
        lo, hi = bounds
        if (self.shape < lo - 1e-4).any() or (self.shape > hi + 1e-4).any():
            raise AvatarFileError(f"{where}: tensor 'template.shape' holds values outside the "
                                  f"{name} template's range [{lo:g}, {hi:g}]")  # fmt: skip

    # ---- writing -----------------------------------------------------------------------------
    def files(self) -> dict[str, bytes]:
        """The four files' contents."""
        from safetensors.torch import save

        tensors = {f"binding.{k}": v.contiguous() for k, v in self.binding.tensors().items()}
        tensors.update({
            "photo.pose": self.photo_pose.float().contiguous(),
            "photo.translation": self.photo_translation.float().contiguous(),
            "template.shape": self.shape.float().contiguous(),
        })  # fmt: skip
        if self.particles is not None:
            tensors.update(self.particles.tensors("particle."))
        if self.eyes is not None:
            tensors.update(self.eyes.tensors("eyes."))
        deformer = {k: v.detach().float().contiguous() for k, v in self.deformer.items()}
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "template": {"kind": self.template, "shape": self.shape.tolist()},
            "camera": {
                "viewmat": self.camera.viewmats[0].tolist(),
                "K": self.camera.Ks[0].tolist(),
                "width": self.camera.width,
                "height": self.camera.height,
            },
            "counts": {"gaussians": len(self.gaussians), "bones": int(self.photo_pose.shape[0])},
            **{k: v for k, v in self.meta.items() if k in ("provenance", "quality")},
        }
        return {
            "avatar.json": json.dumps(doc, indent=2).encode(),
            "gaussians.ply": ply_bytes(self.gaussians),
            "binding.safetensors": save(tensors),
            "deformer.safetensors": save(deformer, metadata={"trained": str(bool(deformer))}),
        }

    def save(self, path: str | os.PathLike, force: bool = False) -> None:
        path = Path(path)
        check_output(path, force)
        files = self.files()
        if path.suffix.lower() == ".zip":
            with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                for name in FILES:
                    zf.writestr(name, files[name])
        else:
            with atomic_path(path) as tmp:
                tmp.mkdir()
                for name in FILES:
                    (tmp / name).write_bytes(files[name])

    # ---- reading -----------------------------------------------------------------------------
    @staticmethod
    def load(path: str | os.PathLike, body: str = "") -> Avatar:
        """Read and check an avatar (folder or .zip). `body`: the user's --body, where the
        template's files are (SMPL-X avatars need it; Anny ones need nothing)."""
        path = Path(path)
        limits = Limits.from_env()
        avatar = Avatar.from_files(read_files(path, limits), str(path), limits)
        if body:
            try:
                kind = template_kind(body)
            except ValueError as exc:
                raise AvatarError(f"--body {body}: {exc}") from None
            if kind != avatar.template:
                raise AvatarError(f"{path} is on the {avatar.template} body template; "
                                  f"--body {body} is a {kind} one")  # fmt: skip
            avatar.body = body
        return avatar

    @staticmethod
    def from_files(files: dict[str, bytes], label: str, limits: Limits) -> Avatar:
        """An avatar from its four files' contents, each checked against `avatar.schema`."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        doc = parse_avatar_json(files["avatar.json"], f"{label}/avatar.json", limits)
        try:
            gaussians = parse_ply(files["gaussians.ply"], f"{label}/gaussians.ply")
        except SplatFileError as exc:
            raise AvatarFileError(str(exc)) from None
        if len(gaussians) != doc.gaussians:
            raise AvatarFileError(f"{label}/gaussians.ply: holds {len(gaussians)} Gaussians but "
                                  f"avatar.json counts {doc.gaussians}")  # fmt: skip
        tensors = {}
        for name in ("binding.safetensors", "deformer.safetensors"):
            try:
                tensors[name] = load(files[name])
            except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
                problem = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise AvatarFileError(f"{label}/{name}: not a readable safetensors file "
                                      f"({problem})") from None  # fmt: skip
        bound = tensors["binding.safetensors"]
        sizes = {"N": doc.gaussians, "J": doc.bones, "S": len(doc.shape)}
        check_binding(bound, sizes, f"{label}/binding.safetensors")
        if not torch.allclose(bound["template.shape"], torch.tensor(doc.shape), atol=1e-5):
            raise AvatarFileError(f"{label}: avatar.json's template.shape and "
                                  "binding.safetensors' template.shape differ")  # fmt: skip
        check_weights(tensors["deformer.safetensors"], f"{label}/deformer.safetensors")
        particles = None
        if "particle.rest" in bound:
            particles = Particles.from_tensors(bound, "particle.")
        eyes = EyeCover.from_tensors(bound, "eyes.") if "eyes.ids" in bound else None
        binding = Binding(**{k[len("binding.") :]: v for k, v in bound.items()
                             if k.startswith("binding.")})  # fmt: skip
        return Avatar(gaussians, binding, doc.template, bound["template.shape"],
                      bound["photo.pose"], bound["photo.translation"], doc.camera, doc.meta,
                      tensors["deformer.safetensors"], particles, eyes, source=label)  # fmt: skip


# ---- reading the files, capped and consistent ---------------------------------------------------
def read_files(path: Path, limits: Limits) -> dict[str, bytes]:
    """The four files of an avatar folder or zip, each read once; at most `limits.bytes`."""
    if path.is_dir():
        for _ in range(20):  # a writer swapped the folder while we read it: read the new one
            files = _read_folder(path, limits.bytes)
            if files is not None:
                return files
            time.sleep(0.05)
        raise AvatarFileError(f"{path}: the avatar keeps changing while being read")
    if not path.exists():
        raise AvatarFileError(f"{path}: no such avatar")
    if not path.is_file():
        raise AvatarFileError(f"{path}: not an avatar (a folder or a .zip of one)")
    return _read_zip(path, limits.bytes)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # never block on a FIFO


def _read_folder(folder: Path, budget: int) -> dict[str, bytes] | None:
    """None when the folder was replaced while being read (then read it again)."""
    dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        inode = os.fstat(dir_fd).st_ino
        files, missing = {}, []
        for name in FILES:
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
            except FileNotFoundError:
                missing.append(name)
                continue
            except OSError as exc:  # ELOOP: a symbolic link
                raise AvatarFileError(f"{folder}/{name}: cannot be opened as a plain file "
                                      f"({exc.strerror}); an avatar holds plain files only") from None  # fmt: skip
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise AvatarFileError(f"{folder}/{name}: not a regular file")
            with os.fdopen(fd, "rb") as fh:
                data = _capped_read(fh, budget, f"{folder}/{name}")
            budget -= len(data)
            files[name] = data
        if missing:
            try:
                replaced = os.stat(folder).st_ino != inode
            except FileNotFoundError:
                replaced = True
            if replaced:
                return None
            raise AvatarFileError(f"{folder}: missing {', '.join(missing)}")
        return files
    finally:
        os.close(dir_fd)


def _capped_read(fh, budget: int, where: str) -> bytes:
    data = fh.read(budget + 1)
    if len(data) > budget:
        raise _too_large(where)
    return data


def _too_large(where: str) -> AvatarFileError:
    return AvatarFileError(f"{where}: larger than the avatar size limit "
                           f"({Limits.from_env().bytes >> 20} MB; set GSAVATAR_MAX_AVATAR_MB to raise it)")  # fmt: skip


def _read_zip(path: Path, budget: int) -> dict[str, bytes]:
    """Only the four files, by exact name; nothing is extracted to disk."""
    with open(path, "rb") as fh:  # one open file: a writer replacing the zip cannot mix versions
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
            raise AvatarFileError(f"{path}: not an avatar (a folder or a .zip of one)") from None
        with zf:
            infos = zf.infolist()
            seen = set()
            for info in infos:
                if info.filename not in FILES:
                    raise AvatarFileError(f"{path}: unexpected entry {info.filename[:80]!r} (an "
                                          f"avatar .zip holds only {', '.join(FILES)})")  # fmt: skip
                if info.filename in seen:
                    raise AvatarFileError(f"{path}: entry {info.filename!r} appears twice")
                seen.add(info.filename)
            missing = [n for n in FILES if n not in seen]
            if missing:
                raise AvatarFileError(f"{path}: missing {', '.join(missing)}")
            if sum(i.file_size for i in infos) > budget:
                raise _too_large(str(path))
            files = {}
            for info in infos:
                try:
                    with zf.open(info) as member:
                        files[info.filename] = _capped_read(
                            member, budget, f"{path}/{info.filename}"
                        )
                except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError,
                        EOFError, OSError, ValueError) as exc:  # fmt: skip
                    raise AvatarFileError(f"{path}/{info.filename}: corrupt or unsupported zip "
                                          f"entry ({str(exc)[:200]})") from None  # fmt: skip
                budget -= len(files[info.filename])
    return files


def is_avatar_path(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (
        (path.is_dir() and (path / "avatar.json").exists())
        or (path.suffix.lower() == ".zip" and path.is_file())
        or path.suffix.lower() == ".avatar"
    )
