"""A generated corpus of bad inputs: photos, speech, videos and splat scenes (avatars are in
`tests/bad_avatars.py`).

Each `Case` makes its input on demand from a few good files (`Good`): missing, empty,
truncated, wrong-type and oversized files, a folder where a file belongs; PLY with bad values,
property lists and counts.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Good:
    avatar: Path  # a small valid avatar folder with full motion weights
    speech: Path  # 1 s of valid speech-like audio
    video: Path  # a valid talking video (with sound)
    photo: Path  # a valid photo of a person
    scene: Path  # a valid 3DGS PLY


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, Good], Path]  # writes the bad input into a folder; returns its path
    expect: str  # a fragment of the one-line error
    names: str = ""  # the file the error must name (default: the input's own name)
    env: dict = field(default_factory=dict)  # environment (limits) for the case
    patch: dict = field(default_factory=dict)  # {"module:NAME": value} set for the case
    motion: bool = False  # caught where motion weights load (drive, finetune, bench)


# ---- raw files -----------------------------------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (with one row of data: a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * min(width, 64) + 1))) + chunk(b"IEND", b""))  # fmt: skip


def _wav_header(data_bytes: int, rate: int = 16000) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))  # fmt: skip


def _float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    data = samples.astype("<f4").tobytes()
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
            + b"data" + struct.pack("<I", len(data)) + data)  # fmt: skip


def _file(name: str, content: Callable[[Good], bytes]) -> Callable[[Path, Good], Path]:
    def make(folder: Path, good: Good) -> Path:
        (folder / name).write_bytes(content(good))
        return folder / name

    return make


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _missing(name: str) -> Callable[[Path, Good], Path]:
    return lambda folder, good: folder / name


def _directory(name: str) -> Callable[[Path, Good], Path]:
    def make(folder: Path, good: Good) -> Path:
        (folder / name).mkdir()
        return folder / name

    return make


def _common(kind: str, suffix: str, good: Callable[[Good], Path],
            cut: Callable[[bytes], bytes] = lambda data: data[: len(data) // 2]) -> list[Case]:  # fmt: skip
    """Cases every input kind shares: missing, empty, truncated, a folder, other kinds' files."""
    others = {"a photo": lambda g: g.photo.read_bytes(), "speech": lambda g: g.speech.read_bytes(),
              "text": lambda g: b"hello, this is not what you think\n" * 20,
              "random bytes": lambda g: np.random.default_rng(0).bytes(4096),
              "a PLY": lambda g: g.scene.read_bytes()[:4096]}  # fmt: skip
    cases = [Case(f"{kind}-missing", _missing(f"nope{suffix}"), "no such"),
             Case(f"{kind}-empty", _file(f"empty{suffix}", lambda g: b""), "empty"),
             Case(f"{kind}-truncated", _file(f"half{suffix}", lambda g: cut(good(g).read_bytes())), ""),
             Case(f"{kind}-a-folder", _directory(f"folder{suffix}"), "a folder")]  # fmt: skip
    for name, content in others.items():
        if name == {"photo": "a photo", "speech": "speech"}.get(kind):
            continue
        cases.append(Case(f"{kind}-is-{name.replace(' ', '-')}",
                          _file(f"wrong{suffix}", content), ""))  # fmt: skip
    return cases


def photo_cases() -> list[Case]:
    blank = lambda g: _encode_png(np.full((256, 256, 3), 255, np.uint8))  # noqa: E731
    return _common("photo", ".png", lambda g: g.photo) + [
        Case("photo-truncated-jpeg", _file("half.jpg", lambda g: _jpeg(g.photo)[:3000]), ""),
        Case("photo-too-small", _file("tiny.png", lambda g: _encode_png(np.zeros((12, 10, 3), np.uint8))), "too small"),
        Case("photo-oversized", _file("huge.png", lambda g: _png(60000, 60000)), "too large"),
        Case("photo-oversized-wide", _file("wide.png", lambda g: _png(300000, 1000)), "too large"),
        Case("photo-no-person", _file("blank.png", blank), "no person"),
    ]  # fmt: skip


def speech_cases() -> list[Case]:
    tone = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220).astype(np.float32)
    nan = tone.copy()
    nan[100] = np.nan
    return _common("speech", ".wav", lambda g: g.speech, lambda data: data[:20]) + [
        Case("speech-header-only", _file("header.wav", lambda g: _wav_header(0)), "no samples"),
        Case("speech-nan-samples", _file("nan.wav", lambda g: _float_wav(nan)), "NaN"),
        Case("speech-video-without-sound", _file("silent.mp4", _video_without_sound), "no audio track"),
        Case("speech-too-long", _file("long.wav", lambda g: _float_wav(np.tile(tone, 3))), "limit",
             patch={"deform.audio:MAX_SECONDS": 2.0}),
    ]  # fmt: skip


def video_cases() -> list[Case]:
    return _common("video", ".mp4", lambda g: g.video) + [
        Case("video-is-audio-only", _file("speech.wav", lambda g: g.speech.read_bytes()), "no video track"),
        Case("video-without-sound", _file("silent.mp4", _video_without_sound), "no audio track"),
    ]  # fmt: skip


def _encode_png(rgb: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", rgb, extension=".png")


def _jpeg(path: Path) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", iio.imread(path)[..., :3], extension=".jpg")


def _video_without_sound(good: Good) -> bytes:
    import tempfile

    from avatar.media import write_video

    with tempfile.TemporaryDirectory() as tmp:
        frames = [np.full((32, 32, 3), 128 + i, np.uint8) for i in range(10)]
        write_video(Path(tmp) / "v.mp4", frames)
        return (Path(tmp) / "v.mp4").read_bytes()


# ---- splat scenes --------------------------------------------------------------------------------
def _ply_with(
    good_ply: bytes, change: Callable[[list[str], np.ndarray], tuple[list[str], bytes]]
) -> bytes:
    """Apply `change(header_lines, table)` to a valid binary PLY; it returns new header and body."""
    end = good_ply.index(b"end_header\n") + len(b"end_header\n")
    header = good_ply[:end].decode().splitlines()
    props = [ln.split()[2] for ln in header if ln.startswith("property")]
    table = np.frombuffer(good_ply[end:], np.dtype([(p, "<f4") for p in props])).copy()
    lines, body = change(header, table)
    return ("\n".join(lines) + "\n").encode() + body


def _set_value(prop: str, value: float):
    def change(header, table):
        table[prop][len(table) // 2] = value
        return header, table.tobytes()

    return change


def _header(old: str, new: str | None, body_rows: slice = slice(None)):
    def change(header, table):
        lines = (
            [ln for ln in header if ln != old]
            if new is None
            else [new if ln == old else ln for ln in header]
        )
        return lines, table[body_rows].tobytes()

    return change


def ply_cases(
    prefix: str, make_ply: Callable[[Path, Good, Callable], Path], names: str = ""
) -> list[Case]:
    """Bad 3DGS PLY files; `make_ply(folder, good, change)` places the changed PLY (a scene or
    inside an avatar) and returns the input's path."""

    def case(name, change, expect):
        return Case(
            f"{prefix}-{name}", lambda folder, good: make_ply(folder, good, change), expect, names
        )

    def count(change_by: int):
        def change(header, table):
            n = len(table)
            return [
                ln.replace(f"element vertex {n}", f"element vertex {n + change_by}")
                for ln in header
            ], table.tobytes()

        return change

    return [
        case("nan-position", _set_value("x", np.nan), "NaN or infinite"),
        case("inf-opacity", _set_value("opacity", np.inf), "NaN or infinite"),
        case("nan-colour", _set_value("f_dc_1", np.nan), "NaN or infinite"),
        case("far-position", _set_value("y", 1e9), "positions beyond"),
        case("huge-scale", _set_value("scale_0", 90.0), "log-scales outside"),
        case("zero-rotation", lambda h, t: (h, _zero_rot(t)), "zero-length rotation"),
        case("missing-rot_3", _drop_property("rot_3"), "missing properties rot_3"),
        case("missing-colour", _drop_property("f_dc_2"), "f_dc_0..2"),
        case("list-property", _header("property float nz", "property list uchar int nz"), "list property"),
        case("unknown-type", _header("property float nz", "property float128 nz"), "bad property line"),
        case("duplicate-property", _duplicate("nx", "ny"), "declared twice"),
        case("count-too-high", count(+1), "truncated"),
        case("count-too-low", count(-1), "lies about the count"),
        case("count-huge", count(10**15), "truncated"),
        case("no-end-header", lambda h, t: ([ln for ln in h if ln != "end_header"], b""), "end_header"),
        case("unknown-format", _header("format binary_little_endian 1.0", "format binary_middle_endian 1.0"), "unsupported PLY format"),
        case("no-vertex-element", lambda h, t: ([ln.replace("element vertex", "element face") for ln in h], t.tobytes()), "no 'vertex' element"),
        case("ascii-junk", lambda h, t: ([ln.replace("binary_little_endian", "ascii") for ln in h], b"1 2 x\n" * len(t)), "ASCII PLY"),
        case("garbage-header-line", lambda h, t: (h[:2] + ["rm -rf /"] + h[2:], t.tobytes()), "unexpected header line"),
    ]  # fmt: skip


def _zero_rot(table: np.ndarray) -> bytes:
    for k in ("rot_0", "rot_1", "rot_2", "rot_3"):
        table[k][3] = 0
    return table.tobytes()


def _drop_property(prop: str):
    def change(header, table):
        keep = [n for n in table.dtype.names if n != prop]
        out = np.empty(len(table), [(n, "<f4") for n in keep])
        for n in keep:
            out[n] = table[n]
        return [ln for ln in header if ln != f"property float {prop}"], out.tobytes()

    return change


def _duplicate(a: str, b: str):
    return _header(f"property float {b}", f"property float {a}")


def scene_cases() -> list[Case]:
    def scene(folder, good, change):
        out = folder / "bad.ply"
        out.write_bytes(_ply_with(good.scene.read_bytes(), change))
        return out

    splat = [Case("splat-truncated", _file("bad.splat", lambda g: b"\0" * 33), "not a positive multiple"),
             Case("splat-nan", _file("bad.splat", lambda g: np.full(8, np.nan, "<f4").tobytes()), "non-finite"),
             Case("splat-far", _file("bad.splat", lambda g: np.array([1e9, 0, 0, 1, 1, 1, 0, 0], "<f4").tobytes()), "out of any real scene's range")]  # fmt: skip
    return _common("scene", ".ply", lambda g: g.scene) + ply_cases("scene", scene) + splat


def tree_digest(path: Path) -> str:
    """A digest of a file or folder (names and contents; links and FIFOs by their kind)."""
    import hashlib

    h = hashlib.sha256()
    if not os.path.lexists(path):
        return "absent"
    items = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
    for p in items:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_symlink():
            h.update(b"link:" + os.readlink(p).encode())
        elif p.is_fifo():
            h.update(b"fifo")
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
