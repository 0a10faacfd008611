"""The avatar part of the bad-input corpus (`tests/bad_inputs.py`): every avatar.json field
missing, mistyped, misshapen, NaN or out of range; binding and motion weights with wrong
dtypes, shapes, keys and values; each file missing, empty, truncated, of the wrong kind or not
a plain file; zips with extra, `..`, absolute, duplicate and oversized entries; the crafted
SMPL-X template that used to run code."""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from avatar.schema import BINDING, FILES, PARTICLES

from .bad_inputs import Case, Good, _file, _half, _missing, _ply_with, ply_cases


# ---- avatars -------------------------------------------------------------------------------------
def copy_avatar(folder: Path, good: Good, name: str = "bad.avatar") -> Path:
    out = folder / name
    shutil.copytree(good.avatar, out)
    return out


def _json_case(name: str, edit: Callable[[dict], None] | bytes, expect: str, **kw) -> Case:
    def make(folder, good):
        out = copy_avatar(folder, good)
        if isinstance(edit, bytes):  # raw bytes
            (out / "avatar.json").write_bytes(edit)
        else:
            doc = json.loads((out / "avatar.json").read_text())
            edit(doc)  # infinities as an overflowing literal, which JSON parsers read as inf
            (out / "avatar.json").write_text(json.dumps(doc).replace("Infinity", "1e999"))
        return out

    return Case(f"json-{name}", make, expect, names=kw.pop("names", "avatar.json"), **kw)


def _set(path: str, value):
    def edit(doc):
        *parents, key = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value(node[key]) if callable(value) else value

    return edit


_DELETE = object()
INF = float("inf")


def json_cases() -> list[Case]:
    cases = [
        _json_case("a-list", b"[1, 2, 3]", "must hold a JSON object"),
        _json_case("a-string", b'"avatar"', "must hold a JSON object"),
        _json_case("null", b"null", "must hold a JSON object"),
        _json_case("not-json", b"{format: gsavatar", "not valid JSON"),
        _json_case("nan-literal", b'{"format": "gsavatar", "version": NaN}', "not valid JSON"),
        _json_case("deep-nesting", b"[" * 100000 + b"]" * 100000, "not valid JSON"),
        _json_case("not-utf8", b"\xff\xfe{}", "not valid JSON"),
        _json_case("version-newer", _set("version", 99), "newer than this toolkit"),
        _json_case("version-zero", _set("version", 0), "field 'version' must be in"),
        _json_case("version-bool", _set("version", True), "field 'version' must be a whole number"),
        _json_case("format-other", _set("format", "gltf"), "not a gsavatar avatar"),
        _json_case("template-unknown-kind", _set("template.kind", "mixamo"), "unknown body template"),
        _json_case("template-path-kind", _set("template.kind", "smplx:/etc"), "unknown body template"),
        Case("json-template-shape-out-of-range", _shape_out_of_range, "outside the anny template's range", names="binding.safetensors"),
        _json_case("template-shape-differs", _set("template.shape", lambda v: [x + 0.1 for x in v]), "template.shape", names="avatar.json"),
        _json_case("template-shape-longer", _set("template.shape", lambda v: v + [0.5]), "'template.shape' has shape", names="binding.safetensors"),
        _json_case("camera-viewmat-not-rotation", _set("camera.viewmat", lambda v: [[2 * x for x in r[:3]] + r[3:] for r in v[:3]] + v[3:]), "orthonormal"),
        _json_case("camera-viewmat-last-row", _set("camera.viewmat", lambda v: v[:3] + [[0, 0, 1, 1]]), "[0, 0, 0, 1]"),
        _json_case("camera-K-zero-focal", _set("camera.K", lambda v: [[0] + v[0][1:]] + v[1:]), "fx, fy > 0"),
        _json_case("camera-K-last-row", _set("camera.K", lambda v: v[:2] + [[0, 1, 1]]), "fx, fy > 0"),
        _json_case("counts-gaussians-off-by-one", _set("counts.gaussians", lambda n: n + 1), "avatar.json counts", names="gaussians.ply"),
        _json_case("counts-bones-off-by-one", _set("counts.bones", lambda n: n + 1), "'photo.pose' has shape", names="binding.safetensors"),
        _json_case("counts-gaussians-over-limit", _set("counts.gaussians", 10**12), "field 'counts.gaussians' must be in"),
        _json_case("provenance-a-list", _set("provenance", [1]), "field 'provenance' must be an object"),
        _json_case("quality-a-string", _set("quality", "great"), "field 'quality' must be an object"),
    ]  # fmt: skip
    # every field: missing, wrong type, and (numbers) wrong shape, NaN / inf, out of range
    fields = {"template": "object", "template.kind": "string", "template.shape": "numbers",
              "camera": "object", "camera.viewmat": "4x4", "camera.K": "3x3",
              "camera.width": "int", "camera.height": "int", "counts": "object",
              "counts.gaussians": "int", "counts.bones": "int", "version": "int"}  # fmt: skip
    for path, kind in fields.items():
        cases.append(
            _json_case(f"{path}-missing", _set(path, _DELETE), f"field '{path}' is missing")
        )
        wrong = 7 if kind == "string" else "seven"
        cases.append(_json_case(f"{path}-wrong-type", _set(path, wrong), f"field '{path}' must be"))
        cases.append(_json_case(f"{path}-null", _set(path, None), f"field '{path}' must be"))
        if kind == "int":
            for name, value in (
                ("zero", 0),
                ("negative", -3),
                ("float", 2.5),
                ("inf", INF),
                ("huge", 10**40),
            ):
                cases.append(
                    _json_case(f"{path}-{name}", _set(path, value), f"field '{path}' must")
                )
        if kind in ("4x4", "3x3"):
            cases += [
                _json_case(f"{path}-short", _set(path, lambda v: v[:-1]), f"field '{path}' must be a"),
                _json_case(f"{path}-ragged", _set(path, lambda v: [r[:-1] for r in v]), f"field '{path}' must be a"),
                _json_case(f"{path}-inf", _set(path, lambda v: [[INF] + r[1:] for r in v]), "NaN or infinite"),
                _json_case(f"{path}-strings", _set(path, lambda v: [["a"] * len(r) for r in v]), "numbers only"),
            ]  # fmt: skip
        if kind == "numbers":
            cases += [
                _json_case(f"{path}-inf", _set(path, lambda v: [INF] + v[1:]), "NaN or infinite"),
                _json_case(f"{path}-huge-list", _set(path, [0.5] * 5000), f"field '{path}' must be a list"),
                _json_case(f"{path}-nested", _set(path, lambda v: [v]), "numbers only"),
            ]  # fmt: skip
    return cases


def _shape_out_of_range(folder: Path, good: Good) -> Path:
    """A consistent avatar.json and binding whose shape parameters no template takes."""
    out = copy_avatar(folder, good)
    doc = json.loads((out / "avatar.json").read_text())
    doc["template"]["shape"] = [50.0] * len(doc["template"]["shape"])
    (out / "avatar.json").write_text(json.dumps(doc))
    tensors = load_file(str(out / "binding.safetensors"))
    tensors["template.shape"] = torch.full_like(tensors["template.shape"], 50.0)
    save_file(tensors, str(out / "binding.safetensors"))
    return out


def _tensors_case(file: str, name: str, edit: Callable[[dict], None], expect: str, **kw) -> Case:
    def make(folder, good):
        out = copy_avatar(folder, good)
        tensors = load_file(str(out / file))
        edit(tensors)
        save_file(tensors, str(out / file))
        return out

    return Case(f"{file.split('.')[0]}-{name}", make, expect, names=file, **kw)


def binding_cases() -> list[Case]:
    f = "binding.safetensors"
    cases = []
    for key, spec in {**BINDING, **PARTICLES}.items():
        other = {torch.float32: torch.float64, torch.int64: torch.int32, torch.uint8: torch.int64}[
            spec.dtype
        ]

        def retype(t, key=key, other=other):
            t[key] = t[key].to(other)

        def drop(t, key=key):
            del t[key]

        def widen(t, key=key):
            t[key] = t[key].unsqueeze(-1).contiguous()

        def shorten(t, key=key):
            t[key] = t[key][:-1].contiguous()

        cases += [
            _tensors_case(f, f"{key}-missing", drop, f"tensor '{key}' is missing"),
            _tensors_case(f, f"{key}-wrong-dtype", retype, f"tensor '{key}' is {str(other)[6:]}"),
            _tensors_case(f, f"{key}-extra-dim", widen, f"tensor '{key}' has shape"),
            _tensors_case(f, f"{key}-one-row-short", shorten, "' has shape"),  # names it or its partner
        ]  # fmt: skip
        if spec.dtype == torch.float32:

            def nan(t, key=key):
                t[key] = t[key].clone()
                t[key].view(-1)[0] = float("nan")

            cases.append(_tensors_case(f, f"{key}-nan", nan, f"tensor '{key}' holds NaN"))
        if spec.below:

            def negative(t, key=key):
                t[key] = t[key].clone()
                t[key].view(-1)[0] = -1

            def beyond(t, key=key):
                t[key] = t[key].clone()
                t[key].view(-1)[-1] = 10**9

            cases += [_tensors_case(f, f"{key}-negative-index", negative, f"tensor '{key}' holds indices outside"),
                      _tensors_case(f, f"{key}-index-beyond", beyond, f"tensor '{key}' holds indices outside")]  # fmt: skip

    def set_(key, fn):
        def edit(t):
            t[key] = fn(t[key].clone())

        return edit

    cases += [
        _tensors_case(f, "extra-tensor", lambda t: t.update(evil=torch.zeros(3)), "unexpected tensor 'evil'"),
        _tensors_case(f, "unknown-part-code", set_("binding.parts", lambda v: v.fill_(99)), "unknown part codes"),
        _tensors_case(f, "particle-unknown-part", set_("particle.parts", lambda v: v.fill_(200)), "unknown part codes"),
        _tensors_case(f, "weights-not-normalised", set_("binding.bone_weights", lambda v: v * 0.5), "sum to 1"),
        _tensors_case(f, "particle-weights-not-normalised", set_("particle.weights", lambda v: v * 0.5), "sum to 1"),
        _tensors_case(f, "negative-weights", set_("binding.bone_weights", lambda v: -v), "outside [0, 1]"),
        _tensors_case(f, "bary-far-outside", set_("binding.bary", lambda v: v * 1e6), "outside [-1, 2]"),
        _tensors_case(f, "pose-huge", set_("photo.pose", lambda v: v + 1e6), "outside [-50, 50]"),
        _tensors_case(f, "translation-huge", set_("photo.translation", lambda v: v + 1e30), "outside"),
        _tensors_case(f, "particle-rest-far", set_("particle.rest", lambda v: v * 1e4), "outside"),
        _tensors_case(f, "too-many-particles", _many_particles, "at most 65536"),
        _tensors_case(f, "too-many-bones-per-gaussian", _wide_skin, "at most 32"),
        _tensors_case(f, "face-beyond-template", set_("binding.face_ids", lambda v: v.fill_(10**6)), "template's triangles"),
        _tensors_case(f, "half-particles", lambda t: t.pop("particle.rest"), "tensor 'particle.rest' is missing"),
    ]  # fmt: skip
    return cases


def _many_particles(t: dict) -> None:
    m = 70_000
    t["particle.rest"] = torch.zeros(m, 3)
    t["particle.parts"] = torch.zeros(m, dtype=torch.uint8)


def _wide_skin(t: dict) -> None:
    n = len(t["binding.bone_ids"])
    t["binding.bone_ids"] = torch.zeros(n, 40, dtype=torch.int64)
    t["binding.bone_weights"] = torch.full((n, 40), 1 / 40)


def deformer_cases() -> list[Case]:
    f = "deformer.safetensors"

    def first(t):
        return sorted(t)[0]

    def retype(t):
        t[first(t)] = t[first(t)].half()

    def nan(t):
        t[first(t)] = t[first(t)].clone().fill_(float("nan"))

    def reshape(t):
        t[first(t)] = torch.cat([t[first(t)], t[first(t)]])

    return [
        _tensors_case(f, "wrong-dtype", retype, "float16, expected float32"),
        _tensors_case(f, "int-weights", lambda t: t.update(x=torch.zeros(2, dtype=torch.int64)), "int64, expected float32"),
        _tensors_case(f, "nan", nan, "holds NaN or infinite"),
        _tensors_case(f, "wrong-shape", reshape, "the deformer's is", motion=True),
        _tensors_case(f, "missing-key", lambda t: t.pop(first(t)), "is missing", motion=True),
        _tensors_case(f, "unexpected-key", lambda t: t.update(stale=torch.zeros(2)), "'stale' is unexpected", motion=True),
        _tensors_case(f, "another-version", lambda t: [t.pop(k) for k in sorted(t)[::2]], "avatar finetune", motion=True),
    ]  # fmt: skip


def file_cases() -> list[Case]:
    """Each of the four files missing, empty, truncated, of the wrong kind, or not a plain file."""
    cases = []
    for name in FILES:

        def member(content, name=name):
            def make(folder, good):
                out = copy_avatar(folder, good)
                (out / name).unlink()
                content(out / name, good)
                return out

            return make

        stem = name.split(".")[0]
        cases += [
            Case(f"{stem}-missing", member(lambda p, g: None), f"missing {name}"),
            Case(f"{stem}-empty", member(lambda p, g: p.write_bytes(b"")), "", names=name),
            Case(f"{stem}-truncated", member(lambda p, g, n=name: p.write_bytes(_half(g.avatar / n))), "", names=name),
            Case(f"{stem}-wrong-kind", member(lambda p, g: p.write_bytes(g.photo.read_bytes())), "", names=name),
            Case(f"{stem}-a-folder", member(lambda p, g: p.mkdir()), "not a regular file", names=name),
            Case(f"{stem}-a-link", member(lambda p, g, n=name: p.symlink_to(g.avatar / n)), "plain files only", names=name),
            Case(f"{stem}-a-fifo", member(lambda p, g: os.mkfifo(p)), "not a regular file", names=name),
        ]  # fmt: skip
    return cases


def _zip_of(entries: list[tuple[str, bytes]], compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compress) as zf:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted here
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return buf.getvalue()


def zip_cases() -> list[Case]:
    def good_entries(g: Good) -> list[tuple[str, bytes]]:
        return [(n, (g.avatar / n).read_bytes()) for n in FILES]

    def zipped(name, entries, expect, compress=zipfile.ZIP_STORED, **kw):
        return Case(
            f"zip-{name}", _file("bad.zip", lambda g: _zip_of(entries(g), compress)), expect, **kw
        )

    return [
        zipped("extra-entry", lambda g: good_entries(g) + [("notes.txt", b"hi")], "unexpected entry 'notes.txt'"),
        zipped("dotdot-entry", lambda g: good_entries(g) + [("../../evil.sh", b"rm -rf ~")], "unexpected entry '../../evil.sh'"),
        zipped("absolute-entry", lambda g: good_entries(g) + [("/tmp/evil.sh", b"x")], "unexpected entry '/tmp/evil.sh'"),
        zipped("nested-entry", lambda g: [("avatar/" + n, d) for n, d in good_entries(g)], "unexpected entry 'avatar/avatar.json'"),
        zipped("folder-entry", lambda g: good_entries(g) + [("avatar.json/", b"")], "unexpected entry 'avatar.json/'"),
        zipped("duplicate-entry", lambda g: good_entries(g) + good_entries(g)[:1], "appears twice"),
        zipped("missing-entry", lambda g: good_entries(g)[1:], "missing avatar.json"),
        zipped("empty-zip", lambda g: [], "missing avatar.json"),
        zipped("bomb", lambda g: good_entries(g)[:3] + [("deformer.safetensors", b"\0" * (3 << 20))], "size limit",
               compress=zipfile.ZIP_DEFLATED, env={"GSAVATAR_MAX_AVATAR_MB": "2"}),
        Case("zip-truncated", _file("bad.zip", lambda g: _zip_of(good_entries(g))[:-100]), "not an avatar"),
        Case("zip-not-a-zip", _file("bad.zip", lambda g: b"PK\x03\x04 not really"), "not an avatar"),
        Case("zip-member-crc", _file("bad.zip", lambda g: _corrupt_crc(_zip_of(good_entries(g)))), "corrupt"),
    ]  # fmt: skip


def _corrupt_crc(data: bytes) -> bytes:
    """Flip a byte inside the first member's data: its CRC no longer matches."""
    buf = bytearray(data)
    buf[200] ^= 0xFF
    return bytes(buf)


def avatar_cases() -> list[Case]:
    def in_avatar(folder, good, change):
        out = copy_avatar(folder, good)
        (out / "gaussians.ply").write_bytes(_ply_with((out / "gaussians.ply").read_bytes(), change))
        return out

    def as_zip(case: Case) -> Case:
        def make(folder, good):
            inner = case.make(folder, good)
            entries = [(n, (inner / n).read_bytes()) for n in FILES if (inner / n).is_file()]
            (folder / "bad.zip").write_bytes(_zip_of(entries))
            return folder / "bad.zip"

        return Case(
            case.id + "-zipped", make, case.expect, case.names, case.env, case.patch, case.motion
        )

    def crafted_template(folder, good):
        out = copy_avatar(folder, good, "stranger.avatar")
        doc = json.loads((out / "avatar.json").read_text())
        doc["version"] = 1
        doc["template"] = {"name": f"smplx:{out / 'model'}", "shape": doc["template"]["shape"]}
        (out / "avatar.json").write_text(json.dumps(doc))
        (out / "model").mkdir()
        np.savez(
            out / "model" / "SMPLX_NEUTRAL.npz",
            v_template=np.array([_Payload(folder / "PWNED")], dtype=object),
        )
        return out

    bad = (json_cases() + binding_cases() + deformer_cases() + file_cases()
           + ply_cases("ply", in_avatar, "gaussians.ply"))  # fmt: skip
    zipped = [
        as_zip(c)
        for c in bad
        if c.id.startswith(("json-camera.K", "binding-binding.bary", "ply-nan", "deformer-nan"))
    ]
    return bad + zipped + zip_cases() + [
        Case("crafted-smplx-template", crafted_template, "--body smplx:PATH", names="stranger.avatar"),
        Case("not-an-avatar-file", _file("photo.avatar", lambda g: g.photo.read_bytes()), "not an avatar"),
        Case("missing-avatar", _missing("gone.avatar"), "no such avatar"),
        Case("too-many-gaussians", lambda folder, good: copy_avatar(folder, good), "counts.gaussians",
             names="avatar.json", env={"GSAVATAR_MAX_GAUSSIANS": "1000"}),
        Case("over-size-limit", lambda folder, good: copy_avatar(folder, good), "size limit",
             names="bad.avatar", env={"GSAVATAR_MAX_AVATAR_MB": "1"}),
    ]  # fmt: skip


class _Payload:
    """Unpickling it creates a marker file: evidence that an avatar ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
