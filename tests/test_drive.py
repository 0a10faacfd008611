"""`avatar drive` end to end: the rig, the video and its sound, streaming, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from deform.audio import load_audio
from render import has_gsplat

from .helpers import avatar_in_process, requires_cuda, template_avatar
from .test_deformer import speechlike

pytest.importorskip("anny", reason="drive needs the Anny template")


def run_avatar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avatar", *args], capture_output=True, text=True, timeout=600
    )


def write_wav(path, samples, rate=16000, channels=1):
    from avatar.media import write_wav as write

    if channels == 1:
        write(path, samples, rate)
        return path
    import wave

    pcm = (np.repeat(samples[:, None], channels, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("drive") / "t.avatar"
    template_avatar(3000).save(path)
    return path


def video_info(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(v))
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        audio_s = sum(f.samples for f in c.decode(a)) / a.rate
        codecs = (v.codec_context.name, a.codec_context.name)
    return frames, audio_s, codecs


def test_rig_at_rest_matches_skinning_and_jaw_opens():
    from avatar.pipelines.drive import Driver
    from deform.rig import relax_arms

    avatar = template_avatar(3000)  # arms already hanging, so the rig's base is the photo's pose
    tpl = avatar.body_template()
    avatar.photo_pose = relax_arms(tpl, avatar.shape, avatar.photo_pose)
    drv = Driver(avatar)
    rig = drv.rig
    e = len(tpl.expression_names)
    with torch.no_grad():
        t0 = rig.transforms(torch.zeros(1, rig.driven.numel(), 3))[0]
        still = rig.pose(torch.zeros(e), t0)
        from avatar.pipelines.create import posed_gaussians

        body = posed_gaussians(avatar, tpl, "body")  # no motion: the body-frame pose
        assert torch.allclose(still.means, body.means, atol=1e-5)
        assert torch.allclose(still.quats.abs(), body.quats.abs(), atol=1e-4)
        jaw = torch.zeros(e)
        jaw[tpl.expression_names.index("jawOpen")] = 1
        opened = rig.pose(jaw, t0)
    lips = avatar.binding.parts == 2
    drop = (still.means - opened.means)[:, 1]
    assert drop[lips].max() > 0.005  # the lower lip goes down by millimetres to centimetres
    assert drop[avatar.binding.parts == 0].abs().max() < 1e-3  # the body stays (chin: < 1 mm)


def test_drive_writes_video_with_sound(small, tmp_path):
    x = speechlike(1.6).numpy()  # 16 kHz; written at 22.05 kHz stereo, resampled on load
    x = np.interp(np.arange(int(1.6 * 22050)) / 22050, np.arange(len(x)) / 16000, x)
    wav = write_wav(tmp_path / "speech.wav", x.astype(np.float32), rate=22050, channels=2)
    out = tmp_path / "talk.mp4"
    res = run_avatar(
        "drive", str(small), str(wav), "-o", str(out), "--size", "96", "--framing", "face"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    frames, audio_s, codecs = video_info(out)
    assert frames == 40 and codecs == ("h264", "aac")
    assert abs(audio_s - 1.6) < 1 / 25 + 0.03  # AAC priming aside, within a frame
    assert "wrote" in res.stdout
    # no temporary leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav", "talk.mp4"]


def test_the_mouth_moves_with_speech_and_rests_in_silence(small):
    """The shipped deformer opens the jaw on speech, not in silence, and the video shows it
    (1 s of silence, then 2 s of the packaged demo sentence)."""
    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver
    from avatar.scenes import demo_speech

    drv = Driver(Avatar.load(small), DriveConfig(size=96, framing="face"))
    speech = load_audio(demo_speech()).samples[8000:40000]
    x = np.concatenate([np.zeros(16000, np.float32), speech])
    with torch.no_grad():
        motion, _ = drv.model(
            torch.from_numpy(x), drv.tokens, drv.model.start(drv.tokens), 75, 25.0
        )
    jaw = motion.actions[:, 0].numpy()  # TEMPLATE_ACTIONS[0] is jawOpen
    assert jaw[30:].max() > 0.2 and jaw[30:].max() > 3 * jaw[5:22].max(), jaw
    frames = np.stack(list(drv.frames(x, 75, progress=False))).astype(float)
    silent = np.abs(np.diff(frames[5:22], axis=0)).mean()
    talking = np.abs(np.diff(frames[30:], axis=0)).mean()
    assert talking > 1.2 * silent, (talking, silent)


def test_views_and_framings(small, tmp_path):
    wav = write_wav(tmp_path / "s.wav", speechlike(0.4).numpy())
    for view, framing, height in (("orbit", "full", 0), ("yaw=30", "upper", 36)):
        out = tmp_path / f"{framing}.mp4"
        res = run_avatar("drive", str(small), str(wav), "-o", str(out), "--size", "64",
                         "--height", str(height), "--view", view, "--framing", framing,
                         "--fps", "20")  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        assert video_info(out)[0] == 8
        with av.open(str(out)) as c:  # --height 0 is square
            assert (c.streams.video[0].width, c.streams.video[0].height) == (64, height or 64)
    res = avatar_in_process(
        "drive", str(small), str(wav), "-o", str(tmp_path / "no.mp4"), "--height", "-2"
    )
    assert res.returncode == 2 and "--height" in res.stderr and "Traceback" not in res.stderr


def test_silent_audio_gives_a_calm_video(small, tmp_path):
    wav = write_wav(tmp_path / "silence.wav", np.zeros(16000, np.float32))
    out = tmp_path / "calm.mp4"
    res = run_avatar("drive", str(small), str(wav), "-o", str(out), "--size", "64")
    assert res.returncode == 0, res.stderr[-2000:]
    assert video_info(out)[0] == 25


@pytest.mark.parametrize(
    "content", [b"", b"this is not audio at all" * 40, b"RIFF\x00\x00\x00\x00WAVEfmt "]
)
def test_bad_audio_is_a_clear_error_and_writes_nothing(small, tmp_path, content):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    out = tmp_path / "out.mp4"
    res = avatar_in_process("drive", str(small), str(bad), "-o", str(out), "--size", "64")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "bad.wav" in res.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav"]


def test_bad_arguments(small, tmp_path):
    wav = write_wav(tmp_path / "s.wav", speechlike(0.2).numpy())
    res = avatar_in_process("drive", str(small), str(wav), "-o", str(tmp_path / "x.gif"))
    assert res.returncode == 2 and ".mp4" in res.stderr
    res = avatar_in_process(
        "drive", str(small), str(wav), "-o", str(tmp_path / "x.mp4"), "--view", "sideways"
    )
    assert res.returncode == 2 and "--view" in res.stderr
    res = avatar_in_process(
        "drive", str(small), str(wav), "-o", str(tmp_path / "z.mp4"), "--framing", "feet"
    )
    assert res.returncode == 2 and "--framing 'feet'" in res.stderr
    assert not (tmp_path / "z.mp4").exists()
    res = avatar_in_process("drive", str(small), str(wav), "-o", str(tmp_path / "z.mp4"),
                            "--audio-encoder", str(tmp_path))  # fmt: skip
    assert res.returncode == 2 and "trained on log-mel features" in res.stderr
    assert not (tmp_path / "z.mp4").exists()
    res = avatar_in_process(
        "drive", str(tmp_path / "nobody.avatar"), str(wav), "-o", str(tmp_path / "y.mp4")
    )
    assert res.returncode == 2 and "no such avatar" in res.stderr
    if not torch.cuda.is_available():  # asked for a GPU that is not there: said, nothing written
        res = avatar_in_process("drive", str(small), str(wav), "-o", str(tmp_path / "g.mp4"),
                                "--device", "cuda")  # fmt: skip
        assert (
            res.returncode == 2 and "--device cuda: this machine's torch sees no CUDA" in res.stderr
        )
        assert not (tmp_path / "g.mp4").exists()
    res = avatar_in_process(
        "drive", str(small), str(wav), "-o", str(tmp_path / "g.mp4"), "--device", "tpu"
    )
    assert res.returncode == 2 and "--device 'tpu': use auto, cpu or cuda[:N]" in res.stderr


def test_eval_sync_cli_on_a_driven_video(small, tmp_path):
    import json

    wav = write_wav(tmp_path / "s.wav", speechlike(1.0).numpy())
    out = tmp_path / "t.mp4"
    assert (
        run_avatar(
            "drive", str(small), str(wav), "-o", str(out), "--size", "128", "--framing", "face"
        ).returncode
        == 0
    )
    res = run_avatar("eval", "sync", str(out), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["sync"]["frames"] == 25 and "best_r" in doc["sync"] and doc["identity"] is None
    if doc["sync"]["face_found_fraction"] < 0.9:  # the grey template: a hint, not silence
        assert "--framing face" in res.stderr
    # the grey template avatar has no face a detector finds: a clear error, not a traceback
    res = avatar_in_process("eval", "sync", str(out), "--avatar", str(small), "--size", "128")
    assert res.returncode == 2 and "no face" in res.stderr and "Traceback" not in res.stderr
    res = avatar_in_process("eval", "sync", str(tmp_path / "s.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_bench_drive_prints_a_stage_profile_and_a_flame_graph_file(small, tmp_path):
    folded = tmp_path / "drive.folded"
    res = run_avatar("bench", "drive", "--avatar", str(small), "--seconds", "2", "--long-seconds",
                     "0", "--size", "64", "--profile", str(folded), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    stages = ("setup", "audio", "deformer", "rig", "render", "encode", "other")
    assert tuple(result["stage_seconds"]) == stages and tuple(result["stage_shares"]) == stages
    assert sum(result["stage_shares"].values()) == pytest.approx(1.0, abs=0.01)
    for name in ("deformer", "rig", "render"):  # the per-frame work is where it should be
        assert result["stage_seconds"][name] > 0, name
    assert result["end_to_end_s"] > result["stage_seconds"]["render"]
    lines = folded.read_text().splitlines()
    stacks = [line.rsplit(" ", 1) for line in lines]
    assert all(count.isdigit() for _, count in stacks)
    assert any("rasterize (render/rasterize.py" in stack for stack, _ in stacks)
    assert any("forward (deform/deformer.py" in stack for stack, _ in stacks)


def test_profile_stages_are_exclusive_and_free_when_off():
    import time

    from render import profiling

    with profiling.stage("nothing"):  # no active profile: nothing is recorded anywhere
        pass
    with profiling.Profile() as prof:
        with profiling.stage("outer"):
            time.sleep(0.05)
            with profiling.stage("inner"):
                time.sleep(0.1)
    seconds = prof.seconds()
    # a sleep never ends early but may end late on a busy machine (the suite's 2 cores): lower
    # bounds only. Exclusive: the stages and "other" add up to the wall time; outer counting
    # the inner stage's time too would overshoot it by 0.1 s
    assert seconds["inner"] >= 0.1 - 1e-3
    assert seconds["outer"] >= 0.05 - 1e-3
    report = prof.report(("outer", "inner"))
    assert sum(report["seconds"].values()) == pytest.approx(prof.wall, abs=1e-3)


def test_posing_by_sparse_products_equals_the_gather(small):
    """Driving poses Gaussians with sparse weight matrices (no gradients); training gathers.
    Both give the same Gaussians, and the same frames."""
    from avatar.asset import Avatar
    from avatar.pipelines.drive import speech_rig
    from render import fit_to_points, rasterize

    rig = speech_rig(Avatar.load(small))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        transforms = rig.transforms(torch.randn(1, rig.driven.numel(), 3, generator=gen) * 0.1)[0]
        actions = torch.rand(len(rig.template.expression_names), generator=gen) * 0.5
        m = len(rig.particles.rest)
        moves = torch.eye(4).repeat(m, 1, 1)
        moves[:, :3, 3] = torch.randn(m, 3, generator=gen) * 0.003
        offsets = torch.randn(len(rig.gaussians), 3, generator=gen) * 0.002
        kernel = rig.pose(actions, transforms, moves, offsets)  # deform.posing's numba pass
        still = rig.pose(actions, transforms)  # no particle motion, no offsets
        rig.use_kernel = False
        fast = rig.pose(actions, transforms, moves, offsets)  # torch, sparse products
        still_torch = rig.pose(actions, transforms)
        rig.bone_matrix = rig.particle_matrix = None
        slow = rig.pose(actions, transforms, moves, offsets)  # torch, gathers (as in training)
        cam = fit_to_points(rig.framing_points("upper"), 128, 128, 0.0, 0.0, 30.0, 0.8)
        frames = [rasterize(g, cam, background=torch.ones(3)).rgb for g in (kernel, fast, slow)]
    for a, b in ((fast, slow), (kernel, slow), (still, still_torch)):
        assert (a.means - b.means).abs().max() < 1e-5
        assert (a.quats - b.quats).abs().max() < 1e-5
    for frame in frames[:2]:  # the same to float rounding: a depth tie may swap two splats
        diff = (frame - frames[2]).abs()
        assert diff.max() < 1e-2 and diff.mean() < 1e-5, (diff.max(), diff.mean())
    assert fast.means.sub(rig.gaussians.means).abs().max() > 0.01  # it did move


@requires_cuda
@pytest.mark.skipif(
    not has_gsplat(), reason="gsplat is not installed (pip install 'gsavatar[cuda]')"
)
def test_drive_on_cuda_gives_the_cpu_frames(small):
    """--device cuda poses on the GPU and renders with gsplat: the same video as the CPU path up
    to the backends' float rounding and alpha clamp (0.999 against 0.99)."""
    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver

    samples = speechlike(2.0).numpy()
    frames = {}
    for device in ("cpu", "cuda"):
        drv = Driver(Avatar.load(small), DriveConfig(size=256, framing="upper", device=device))
        assert drv.rig.gaussians.means.device.type == device
        frames[device] = np.stack(list(drv.frames(samples, 50, progress=False))).astype(float)
    diff = np.abs(frames["cpu"] - frames["cuda"])
    assert diff.mean() < 0.5 and np.quantile(diff, 0.999) < 24, (diff.mean(), diff.max())


def test_the_gaussian_head_on_the_moving_face_gives_the_whole_bodys_frames(small):
    """Drive runs the Gaussian head on the Gaussians the face's expressions move and sets the
    other residuals to zero (`Motion.spread`): the moving ones get exactly what the head gives
    them over the whole body, and the frames match the whole body's within 2/255."""
    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver
    from render import fit_to_points, rasterize

    d = Driver(Avatar.load(small), DriveConfig(size=128, device="cpu"))
    rig, model = d.rig, d.model
    x = speechlike(1.2)
    with torch.no_grad():
        whole, _ = model(x, d.tokens, model.start(d.tokens), 25, 25.0)
        part, _ = model(x, d.tokens, model.start(d.tokens), 25, 25.0, gaussian_ids=rig.moving)
        part = part.spread(rig.moving, len(rig.gaussians))
        assert 0 < len(rig.moving) < len(rig.gaussians)
        for name in ("offsets", "log_scales", "opacity", "color"):
            a, b = getattr(whole, name), getattr(part, name)
            assert a.shape == b.shape
            assert torch.allclose(a[:, rig.moving], b[:, rig.moving], atol=1e-6)
            assert not b[:, ~torch.isin(torch.arange(len(rig.gaussians)), rig.moving)].any()
        assert part.offsets.abs().max() > 1e-4  # the face does move
        cam = fit_to_points(rig.framing_points("face"), 128, 128, 0.0, 0.0, 30.0, 0.8)
        blink = torch.zeros(25)
        frames = [torch.stack([rasterize(g, cam, background=torch.ones(3)).rgb[0]
                               for g in rig.posed_frames(m, blink)]) for m in (whole, part)]  # fmt: skip
    assert (frames[0] - frames[1]).abs().max() <= 2 / 255


def test_the_rig_reads_lip_bases_at_the_gaussians_places_on_the_template(small):
    """`SpeechRig.anchors` are the Gaussians' places on the template's rest surface (the means
    of an avatar sampled there and never moved); the deformer's lip bases are read there, so a
    Gaussian the reconstruction moved keeps its lip's motion."""
    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver

    avatar = Avatar.load(small)
    d = Driver(avatar, DriveConfig(size=64, device="cpu"))
    assert torch.allclose(d.rig.anchors, avatar.gaussians.means, atol=1e-5)
    moved = Avatar.load(small)
    moved.gaussians = moved.gaussians.replace(means=moved.gaussians.means + 0.004)
    m = Driver(moved, DriveConfig(size=64, device="cpu"))
    with torch.no_grad():
        assert torch.allclose(m.rig.tokens(m.model).lip_bases, d.tokens.lip_bases, atol=1e-6)
        assert d.tokens.lip_bases.abs().max() > 1e-3


def test_closed_lips_meet_and_do_not_pass_through_each_other(small, monkeypatch):
    """/p b m/ over a jaw nearly shut drove the lower lip up through the upper one (its red over
    the upper lip, to the nose): the closed shape is made only as far as the jaw parts the lips
    (`controls.close_on_jaw`). The deformer made to hear nothing but /p b m/ over silence (the
    jaw shut): the lips' middles come closer than at rest by a few millimetres (pressed), where
    the shape made whole brought the lower lip four times as far (3.97 and 17.6 mm)."""
    import deform.controls as controls
    from avatar.articulation import LipGap
    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver
    from deform.controls import VISEMES

    avatar = Avatar.load(small)

    def crossing() -> float:  # millimetres past meeting, the most over a second of silence
        drv = Driver(avatar, DriveConfig(size=64, framing="face"))
        with torch.no_grad():  # every frame heard as the closed shape
            drv.model.visemes.weight.zero_()
            drv.model.visemes.bias.fill_(-20.0)
            drv.model.visemes.bias[VISEMES.index("closed")] = 20.0
        lips = LipGap(avatar, drv.rig, drv.lips_gap)
        assert lips.upper.any() and lips.lower.any()
        return 1000 * (lips.rest - min(lips(g) for g in drv.posed(np.zeros(16000, np.float32), 25)))

    capped = crossing()
    monkeypatch.setattr(controls, "CLOSE_PAST_JAW", 100.0)  # the whole shape, whatever the jaw
    whole = crossing()
    assert 0.5 < capped < 5.0 and whole > 3 * capped, (capped, whole)
