"""The avatar asset: a folder (or a .zip of it) of safe files only, never pickle.

    avatar.json           format version, template and its fitted shape, the photo's camera,
                          counts, provenance and quality figures
    gaussians.ply         the canonical (rest-pose) Gaussians, standard 3DGS layout
    binding.safetensors   how each Gaussian hangs on the template and on the deformer's
                          particles, and the photo's pose
    deformer.safetensors  the avatar's own motion weights (empty: the shipped default is used)

Writes are atomic: everything goes to a temporary sibling that is renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from deform.particles import Particles
from reconstruct.canonical import Binding
from render import Cameras, Gaussians
from render.io import SplatFileError, load_ply, save_ply

from .errors import AvatarError
from .media import atomic_path, check_output

FORMAT = "gsavatar"
VERSION = 1
FILES = ("avatar.json", "gaussians.ply", "binding.safetensors", "deformer.safetensors")


class AvatarFileError(AvatarError):
    """An avatar that cannot be read; the message names the file and the problem."""


@dataclass
class Avatar:
    gaussians: Gaussians  # canonical (rest pose), N
    binding: Binding
    template: str  # "anny" or "smplx:PATH"
    shape: Tensor  # [S] fitted phenotype / betas
    photo_pose: Tensor  # [J, 3] the photo's pose, axis-angle per bone
    photo_translation: Tensor  # [3]
    camera: Cameras  # the input view (1 camera)
    meta: dict = field(default_factory=dict)  # provenance and quality figures
    deformer: dict[str, Tensor] = field(default_factory=dict)  # fine-tuned motion weights
    particles: Particles | None = None  # the deformer's particles (computed when absent)

    # ---- writing -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, force: bool = False) -> None:
        path = Path(path)
        check_output(path, force)
        if path.suffix.lower() == ".zip":
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
                self._write_folder(Path(tmp_dir) / "avatar")
                with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                    for name in FILES:
                        zf.write(Path(tmp_dir) / "avatar" / name, name)
        else:
            with atomic_path(path) as tmp:
                self._write_folder(tmp)

    def _write_folder(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir()
        save_ply(self.gaussians, folder / "gaussians.ply")
        tensors = {f"binding.{k}": v.contiguous() for k, v in self.binding.tensors().items()}
        tensors.update({
            "photo.pose": self.photo_pose.float().contiguous(),
            "photo.translation": self.photo_translation.float().contiguous(),
            "template.shape": self.shape.float().contiguous(),
        })  # fmt: skip
        if self.particles is not None:
            tensors.update(self.particles.tensors("particle."))
        save_file(tensors, str(folder / "binding.safetensors"))
        save_file({k: v.contiguous() for k, v in self.deformer.items()}, str(folder / "deformer.safetensors"),
                  metadata={"trained": str(bool(self.deformer))})  # fmt: skip
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "template": {"name": self.template, "shape": self.shape.tolist()},
            "camera": {
                "viewmat": self.camera.viewmats[0].tolist(),
                "K": self.camera.Ks[0].tolist(),
                "width": self.camera.width,
                "height": self.camera.height,
            },
            "counts": {"gaussians": len(self.gaussians), "bones": int(self.photo_pose.shape[0])},
            **self.meta,
        }
        (folder / "avatar.json").write_text(json.dumps(doc, indent=2))

    # ---- reading -----------------------------------------------------------------------------
    @staticmethod
    def load(path: str | os.PathLike) -> Avatar:
        path = Path(path)
        if not path.exists():
            raise AvatarFileError(f"{path}: no such avatar")
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise AvatarFileError(f"{path}: not an avatar (a folder or a .zip of one)")
            with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                missing = [n for n in FILES if n not in names]
                if missing:
                    raise AvatarFileError(f"{path}: missing {', '.join(missing)}")
                for name in FILES:
                    zf.extract(name, tmp)
                return Avatar._read_folder(Path(tmp), label=path)
        return Avatar._read_folder(path, label=path)

    @staticmethod
    def _read_folder(folder: Path, label: Path) -> Avatar:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        missing = [n for n in FILES if not (folder / n).is_file()]
        if missing:
            raise AvatarFileError(f"{label}: missing {', '.join(missing)}")
        try:
            doc = json.loads((folder / "avatar.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AvatarFileError(f"{label}/avatar.json: not valid JSON ({exc})") from None
        if doc.get("format") != FORMAT or not isinstance(doc.get("version"), int):
            raise AvatarFileError(f"{label}/avatar.json: not a {FORMAT} avatar")
        if doc["version"] > VERSION:
            raise AvatarFileError(f"{label}: format version {doc['version']} is newer than this "
                                  f"toolkit reads ({VERSION}); upgrade gsavatar")  # fmt: skip
        try:
            gaussians = load_ply(folder / "gaussians.ply")
            tensors = load_file(str(folder / "binding.safetensors"))
            deformer = load_file(str(folder / "deformer.safetensors"))
        except SplatFileError as exc:
            raise AvatarFileError(f"{label}: {exc}") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise AvatarFileError(f"{label}: a .safetensors file is unreadable ({exc})") from None
        try:
            binding = Binding(
                **{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("binding.")}
            )
            cam = doc["camera"]
            camera = Cameras(torch.tensor(cam["viewmat"])[None], torch.tensor(cam["K"])[None],
                             int(cam["width"]), int(cam["height"]))  # fmt: skip
            avatar = Avatar(gaussians, binding, doc["template"]["name"], tensors["template.shape"],
                            tensors["photo.pose"], tensors["photo.translation"], camera,
                            {k: v for k, v in doc.items() if k in ("provenance", "quality")}, deformer,
                            Particles.from_tensors(tensors, "particle.") if "particle.rest" in tensors else None)  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise AvatarFileError(f"{label}: incomplete or inconsistent avatar ({exc!r})") from None
        n = len(gaussians)
        if (
            any(t.shape[0] != n for t in binding.tensors().values())
            or (avatar.particles is not None and len(avatar.particles.ids) != n)
            or doc["counts"]["gaussians"] != n
        ):
            raise AvatarFileError(
                f"{label}: gaussians.ply and binding.safetensors disagree on the count"
            )
        return avatar


def is_avatar_path(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (
        (path.is_dir() and (path / "avatar.json").exists())
        or (path.suffix.lower() == ".zip" and path.is_file())
        or path.suffix.lower() == ".avatar"
    )
