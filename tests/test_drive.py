"""`avatar drive` end to end: the rig, the video and its sound, streaming, and bad input."""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from deform.audio import load_audio

from .helpers import template_avatar
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
    for view, framing in (("orbit", "full"), ("yaw=30", "upper")):
        out = tmp_path / f"{framing}.mp4"
        res = run_avatar("drive", str(small), str(wav), "-o", str(out), "--size", "64",
                         "--view", view, "--framing", framing, "--fps", "20")  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        assert video_info(out)[0] == 8


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
    res = run_avatar("drive", str(small), str(bad), "-o", str(out), "--size", "64")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "bad.wav" in res.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav"]


def test_bad_arguments(small, tmp_path):
    wav = write_wav(tmp_path / "s.wav", speechlike(0.2).numpy())
    res = run_avatar("drive", str(small), str(wav), "-o", str(tmp_path / "x.gif"))
    assert res.returncode == 2 and ".mp4" in res.stderr
    res = run_avatar(
        "drive", str(small), str(wav), "-o", str(tmp_path / "x.mp4"), "--view", "sideways"
    )
    assert res.returncode == 2 and "--view" in res.stderr
    res = run_avatar(
        "drive", str(small), str(wav), "-o", str(tmp_path / "z.mp4"), "--framing", "feet"
    )
    assert res.returncode == 2 and "--framing 'feet'" in res.stderr
    assert not (tmp_path / "z.mp4").exists()
    res = run_avatar("drive", str(small), str(wav), "-o", str(tmp_path / "z.mp4"),
                     "--audio-encoder", str(tmp_path))  # fmt: skip
    assert res.returncode == 2 and "trained on log-mel features" in res.stderr
    assert not (tmp_path / "z.mp4").exists()
    res = run_avatar(
        "drive", str(tmp_path / "nobody.avatar"), str(wav), "-o", str(tmp_path / "y.mp4")
    )
    assert res.returncode == 2 and "no such avatar" in res.stderr


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
    # the grey template avatar has no face a detector finds: a clear error, not a traceback
    res = run_avatar("eval", "sync", str(out), "--avatar", str(small), "--size", "128")
    assert res.returncode == 2 and "no face" in res.stderr and "Traceback" not in res.stderr
    res = run_avatar("eval", "sync", str(tmp_path / "s.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
