"""Splat files: the standard 3DGS PLY layout and the antimatter15 `.splat` format.

PLY vertex properties: x y z [nx ny nz] f_dc_0..2 f_rest_0.. opacity scale_0..2 rot_0..3, float32,
binary little-endian (ASCII and big-endian files are read too). `f_rest` is channel-major
(all coefficients of red, then green, then blue), opacity is a logit, scales are logs, rotations
are wxyz; files written here open in common splat viewers. Feature-vector Gaussians are written
as `feat_0..D-1` properties, which viewers ignore.

`.splat`: 32 bytes per Gaussian: position 3xf32, linear scale 3xf32, RGBA u8 (alpha =
opacity), rotation 4xu8 (wxyz, q*128+128). Lossy: SH degree 0 only, 8-bit colour.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .gaussians import Gaussians, sh_degree_of
from .sh import SH_C0

PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
SPLAT_DTYPE = np.dtype(
    [("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)]
)


class SplatFileError(ValueError):
    """A splat file that cannot be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix); move it onto `path` on success only.

    A folder replaces an existing folder in one step where the OS can swap two paths (Linux
    `renameat2(RENAME_EXCHANGE)`), so a reader or a kill at any moment sees the old folder or
    the new one, never none and never a mix. Leftovers of writers that were killed (SIGKILL
    runs no cleanup) are swept first: temporary names of dead processes are removed, and an old
    folder moved aside by the two-step fallback is put back if nothing replaced it."""
    path = Path(path)
    _sweep_leftovers(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    old = path.with_name(f".{path.stem}.old-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            if not _exchange(tmp, path):  # folders cannot be replaced in one step here:
                os.replace(path, old)  # move the old one aside first, so it is never lost
                os.replace(tmp, path)
                shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():  # after a swap: the old folder; after a failure: the partial one
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _sweep_leftovers(path: Path) -> None:
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.(partial|old)-(\d+){re.escape(path.suffix)}")
    try:
        siblings = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if not m or int(m[2]) == os.getpid() or _pid_alive(int(m[2])):
            continue
        with contextlib.suppress(OSError):
            if m[1] == "old" and not path.exists():  # killed between the fallback's two renames
                os.replace(p, path)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the OS or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---- PLY ---------------------------------------------------------------------------------------


def _ply_header(path: str, raw: bytes) -> tuple[str, list[tuple[str, int, list]], int]:
    """Parse the header: (format, [(element, count, [(prop, dtype)])], data offset)."""
    if not raw.startswith(b"ply"):
        raise SplatFileError(path, "not a PLY file (it does not start with 'ply')")
    end = raw.find(b"end_header")
    if end < 0:
        raise SplatFileError(path, "PLY header has no 'end_header' (truncated or not a PLY)")
    nl = raw.find(b"\n", end)
    if nl < 0:
        raise SplatFileError(path, "PLY header is not terminated by a newline")
    fmt, elements = None, []
    for line in raw[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                raise SplatFileError(path, f"list property '{words[-1]}' is not supported")
            if len(words) != 3 or words[1] not in PLY_TYPES:
                raise SplatFileError(path, f"bad property line in header: {line.strip()!r}")
            if any(words[2] == name for name, _ in elements[-1][2]):
                raise SplatFileError(path, f"property '{words[2]}' is declared twice")
            elements[-1][2].append((words[2], PLY_TYPES[words[1]]))
        else:
            raise SplatFileError(path, f"unexpected header line: {line.strip()!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise SplatFileError(path, f"unsupported PLY format {fmt!r}")
    return fmt, elements, nl + 1


def _read_ply_vertices(path: str, raw: bytes) -> np.ndarray:
    fmt, elements, offset = _ply_header(path, raw)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise SplatFileError(path, "PLY has no 'vertex' element")
    if names.index("vertex") != 0 and fmt != "ascii":
        raise SplatFileError(path, "the 'vertex' element must come first")
    _, count, props = elements[names.index("vertex")]
    if not props:
        raise SplatFileError(path, "the 'vertex' element has no properties")
    only = len(elements) == 1  # then the data must hold exactly the declared vertices
    if fmt == "ascii":
        lines = raw[offset:].decode("ascii", errors="replace").split("\n")
        rows = [ln.split() for ln in lines if ln.strip()]
        if len(rows) < count or any(len(r) != len(props) for r in rows[:count]):
            raise SplatFileError(path, f"truncated ASCII PLY: expected {count} vertex rows")
        if only and len(rows) > count:
            raise SplatFileError(path, f"the header declares {count} vertices but "
                                       f"{len(rows)} rows follow")  # fmt: skip
        try:
            table = np.array(rows[:count], dtype=np.float64).reshape(count, len(props))
        except ValueError as exc:
            raise SplatFileError(path, f"non-numeric vertex data ({exc})") from None
        out = np.empty(count, [(n, "f8") for n, _ in props])
        for i, (n, _) in enumerate(props):
            out[n] = table[:, i]
        return out
    endian = "<" if fmt == "binary_little_endian" else ">"
    dtype = np.dtype([(n, endian + t) for n, t in props])
    need, have = count * dtype.itemsize, len(raw) - offset
    if have < need or (only and have != need):
        problem = "truncated" if have < need else "the header lies about the count"
        raise SplatFileError(path, f"{problem}: the header declares {count} vertices "
                                   f"({need} bytes) but {have} bytes of data follow")  # fmt: skip
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset)


def _columns(table: np.ndarray, prefix: str) -> list[str]:
    cols = [n for n in table.dtype.names if n.startswith(prefix)]
    return sorted(cols, key=lambda n: int(n[len(prefix) :]) if n[len(prefix) :].isdigit() else -1)


# Beyond these, float32 maths in projection and compositing overflows: not a real scene.
MAX_ABS_POSITION = 1e6  # metres
LOG_SCALE_RANGE = (-50.0, 20.0)


def parse_ply(raw: bytes, path: str | os.PathLike = "<bytes>") -> Gaussians:
    """Gaussians from the bytes of a 3DGS PLY file; `path` names it in errors."""
    path = str(path)
    table = _read_ply_vertices(path, raw)
    required = ["x", "y", "z", "opacity", "scale_0", "scale_1", "scale_2",
                "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    missing = [n for n in required if n not in table.dtype.names]
    if missing:
        raise SplatFileError(path, f"not a 3DGS PLY: missing properties {', '.join(missing)}")

    def col(*names):
        return torch.from_numpy(np.stack([np.asarray(table[n], np.float32) for n in names], -1))

    means = col("x", "y", "z")
    quats = col("rot_0", "rot_1", "rot_2", "rot_3")
    log_scales = col("scale_0", "scale_1", "scale_2")
    logits = col("opacity")[:, 0]
    sh = features = None
    feat = _columns(table, "feat_")
    if feat:
        features = col(*feat)
    else:
        dc = _columns(table, "f_dc_")
        if len(dc) != 3:
            raise SplatFileError(path, "not a 3DGS PLY: needs f_dc_0..2 (or feat_*) colours")
        rest = _columns(table, "f_rest_")
        if len(rest) % 3:
            raise SplatFileError(path, f"{len(rest)} f_rest properties is not a multiple of 3")
        try:
            sh_degree_of(1 + len(rest) // 3)
        except ValueError:
            problem = f"{len(rest)} f_rest properties is not an SH degree 0-3"
            raise SplatFileError(path, problem) from None
        sh0 = col(*dc)[:, None]
        if rest:
            sh_rest = col(*rest).reshape(len(table), 3, -1).transpose(1, 2)
            sh0 = torch.cat([sh0, sh_rest], dim=1)
        sh = sh0
    tensors = [means, quats, log_scales, logits] + [t for t in (sh, features) if t is not None]
    if not all(torch.isfinite(t).all() for t in tensors):
        raise SplatFileError(path, "contains NaN or infinite values")
    if (quats.norm(dim=-1) == 0).any():
        raise SplatFileError(path, "contains zero-length rotation quaternions")
    if (means.abs() > MAX_ABS_POSITION).any():
        raise SplatFileError(path, f"positions beyond {MAX_ABS_POSITION:g} m")
    lo, hi = LOG_SCALE_RANGE
    if ((log_scales < lo) | (log_scales > hi)).any():
        raise SplatFileError(path, f"log-scales outside [{lo:g}, {hi:g}]")
    return Gaussians(means, quats, log_scales, logits, sh=sh, features=features)


def load_ply(path: str | os.PathLike) -> Gaussians:
    return parse_ply(Path(path).read_bytes(), path)


def ply_bytes(gaussians: Gaussians) -> bytes:
    """The standard 3DGS PLY layout (binary little-endian float32)."""
    g = gaussians.detach().to("cpu", torch.float32)
    n = len(g)
    cols: dict[str, np.ndarray] = {}
    for i, name in enumerate("xyz"):
        cols[name] = g.means[:, i].numpy()
    for name in ("nx", "ny", "nz"):
        cols[name] = np.zeros(n, np.float32)
    if g.sh is not None:
        for i in range(3):
            cols[f"f_dc_{i}"] = g.sh[:, 0, i].numpy()
        rest = g.sh[:, 1:].transpose(1, 2).reshape(n, -1).numpy()  # channel-major
        for i in range(rest.shape[1]):
            cols[f"f_rest_{i}"] = rest[:, i]
    else:
        for i in range(g.features.shape[1]):
            cols[f"feat_{i}"] = g.features[:, i].numpy()
    cols["opacity"] = g.opacity_logits.numpy()
    for i in range(3):
        cols[f"scale_{i}"] = g.log_scales[:, i].numpy()
    for i in range(4):
        cols[f"rot_{i}"] = g.quats[:, i].numpy()
    table = np.empty(n, [(k, "<f4") for k in cols])
    for k, v in cols.items():
        table[k] = v
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"element vertex {n}\n" + "".join(f"property float {k}\n" for k in cols)
    header += "end_header\n"
    return header.encode("ascii") + table.tobytes()


def save_ply(gaussians: Gaussians, path: str | os.PathLike) -> None:
    """Write the standard 3DGS PLY layout, atomically."""
    _atomic_write(Path(path), ply_bytes(gaussians))


# ---- .splat ------------------------------------------------------------------------------------


def save_splat(gaussians: Gaussians, path: str | os.PathLike) -> None:
    """Write the `.splat` format (SH degree 0 only), sorted by opacity x volume like viewers."""
    g = gaussians.detach().to("cpu", torch.float32)
    if g.sh is None:
        raise ValueError(".splat stores RGB colour; feature-vector Gaussians need PLY")
    scales = g.scales
    opac = g.opacities
    order = torch.argsort(-(scales.prod(-1) * opac))
    rgb = (g.sh[:, 0] * SH_C0 + 0.5).clamp(0, 1)
    q = torch.nn.functional.normalize(g.quats, dim=-1)
    table = np.empty(len(g), SPLAT_DTYPE)
    table["pos"] = g.means[order].numpy()
    table["scale"] = scales[order].numpy()
    rgba = torch.cat([rgb, opac[:, None]], -1)[order]
    table["rgba"] = (rgba * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    table["rot"] = (q[order] * 128 + 128).round().clamp(0, 255).to(torch.uint8).numpy()
    _atomic_write(Path(path), table.tobytes())


def load_splat(path: str | os.PathLike) -> Gaussians:
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) == 0 or len(raw) % SPLAT_DTYPE.itemsize:
        raise SplatFileError(
            path,
            f"size {len(raw)} bytes is not a positive multiple of {SPLAT_DTYPE.itemsize} "
            "(truncated or not a .splat file)",
        )
    table = np.frombuffer(raw, SPLAT_DTYPE)
    means = torch.from_numpy(table["pos"].copy())
    scales = torch.from_numpy(table["scale"].copy())
    if not (torch.isfinite(means).all() and torch.isfinite(scales).all()) or (scales <= 0).any():
        raise SplatFileError(path, "non-finite positions or non-positive scales")
    lo, hi = LOG_SCALE_RANGE
    if (
        (means.abs() > MAX_ABS_POSITION).any()
        or (scales.log() < lo).any()
        or (scales.log() > hi).any()
    ):
        raise SplatFileError(path, "positions or scales out of any real scene's range")
    rgba = torch.from_numpy(table["rgba"].astype(np.float32) / 255.0)
    quats = (torch.from_numpy(table["rot"].astype(np.float32)) - 128) / 128
    quats[quats.norm(dim=-1) == 0] = torch.tensor([1.0, 0, 0, 0])
    return Gaussians.from_activated(
        means, scales, rgba[:, 3].clamp(1 / 512, 1 - 1 / 512), quats=quats, rgb=rgba[:, :3]
    )


def load_splats(path: str | os.PathLike) -> Gaussians:
    """Read a `.ply` or `.splat` file by its extension; errors name the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise SplatFileError(path, "a folder, not a splat file")
    if not path.is_file():
        raise SplatFileError(path, "no such file")
    if path.stat().st_size == 0:
        raise SplatFileError(path, "file is empty")
    suffix = path.suffix.lower()
    if suffix == ".ply":
        return load_ply(path)
    if suffix == ".splat":
        return load_splat(path)
    raise SplatFileError(path, f"unknown splat format {suffix!r} (expected .ply or .splat)")
