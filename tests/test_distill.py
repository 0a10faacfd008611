"""Distillation: loss weights and terms, the trainer (checkpoints, exact resume, metrics, DDP) and
`avatar finetune` end to end with the procedural teacher."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from distill.losses import ArapGraph, Weight, loss_arap, loss_keypoints, loss_lip_motion
from distill.trainer import TrainConfig, load_checkpoint_info, train
from render.rotations import axis_angle_to_rotmat

from .helpers import avatar_in_process, template_avatar, tiny_wav2vec
from .test_deformer import speechlike
from .test_drive import run_avatar, write_wav


def test_lip_motion_loss_measures_the_visemes_lip_shape():
    """Still particles score 1 (all of the wanted lip motion missing, in its own units); Δp that
    make exactly the expression basis's displacement score 0; half of it scores a quarter."""
    from types import SimpleNamespace

    from avatar.pipelines.drive import speech_rig
    from deform.controls import PARTICLE_ACTIONS, action_index

    rig = speech_rig(template_avatar(3000))
    lip_ids = action_index(rig.template, PARTICLE_ACTIONS)
    ids = rig.moving[::3].contiguous()
    t, m = 4, len(rig.particles.rest)
    lips = torch.rand(t, len(lip_ids), generator=torch.Generator().manual_seed(0))
    still = torch.eye(4).expand(t, m, 4, 4)
    basis = rig.basis[lip_ids][:, torch.searchsorted(rig.moving, ids)]
    want = torch.einsum("te,enc->tnc", lips, basis)
    assert want.abs().max() > 1e-3  # the lip actions move these Gaussians by millimetres

    def loss(offsets):
        motion = SimpleNamespace(lips=lips, particles=still)
        return float(loss_lip_motion(rig, rig.gaussians.means, motion, ids, offsets, lip_ids))

    assert loss(torch.zeros_like(want)) == pytest.approx(1.0, rel=1e-5)
    assert loss(want) == pytest.approx(0.0, abs=1e-6)
    assert loss(0.5 * want) == pytest.approx(0.25, rel=1e-4)


def test_weight_schedules():
    assert Weight.parse("0.5")(1000) == 0.5
    ramp = Weight.parse("0@0,1@100")
    assert [ramp(s) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert Weight.parse("1@10,0@20")(0) == 1.0
    with pytest.raises(ValueError, match="use 0.5"):
        Weight.parse("fast")


def test_keypoint_loss_is_robust_and_masks_hands_and_invisible_points():
    ours = torch.zeros(2, 4, 2)
    teacher = torch.zeros(2, 4, 2)
    hand = torch.tensor([False, False, True, True])
    assert loss_keypoints(ours, teacher, hand) == 0
    teacher[:, 0] = torch.tensor([3.0, 4.0])  # a face keypoint 5 px off
    face_only = loss_keypoints(ours, teacher, hand, delta=2.0)
    assert face_only == pytest.approx((math.sqrt(25 + 4) - 2) / 2, rel=1e-5)
    teacher[:, 2] = torch.tensor([300.0, 400.0])  # an outlier on a hand: linear, not quadratic
    both = loss_keypoints(ours, teacher, hand, lambda_hand=0.5, delta=2.0)
    assert both - face_only == pytest.approx(0.5 * (math.sqrt(500**2 + 4) - 2) / 2, rel=1e-5)
    visible = torch.ones(2, 4, dtype=torch.bool)
    visible[:, 2] = False
    assert loss_keypoints(ours, teacher, hand, visible, 0.5, 2.0) == pytest.approx(float(face_only))


def test_centred_keypoints_ignore_a_head_offset_but_not_the_mouth_shape():
    gen = torch.Generator().manual_seed(0)
    ours = torch.rand(3, 6, 2, generator=gen) * 100
    hand = torch.tensor([False] * 4 + [True] * 2)
    shifted = ours.clone()
    shifted[:, :4] += torch.tensor([7.0, -3.0])  # the whole face moved: head offset
    assert loss_keypoints(ours, shifted, hand, centred=True) < 1e-5
    assert loss_keypoints(ours, shifted, hand) > 1
    opened = ours.clone()
    opened[:, 1, 1] += 6.0  # one lip keypoint moved: a different mouth shape
    assert loss_keypoints(ours, opened, hand, centred=True) > 0.5


def test_arap_is_zero_for_rigid_motion_only():
    gen = torch.Generator().manual_seed(0)
    rest = torch.rand(64, 3, generator=gen)
    graph = ArapGraph.build(rest, k=6)
    r = axis_angle_to_rotmat(torch.tensor([[0.3, -0.5, 0.2]]))[0]
    moved = (rest @ r.T + torch.tensor([0.1, 0.2, -0.3]))[None]
    rots = r.expand(1, 64, 3, 3)
    assert loss_arap(graph, moved, rots) < 1e-10
    stretched = moved.clone()
    stretched[..., 0] *= 1.2
    assert loss_arap(graph, stretched, rots) > 1e-4


class Toy(nn.Module):
    """A regression objective with the trainer's interface; randomness from the step's rng."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, step, rng, gen):
        x = torch.from_numpy(rng.standard_normal((16, 3))).float()
        noise = torch.randn(16, 2, generator=gen) * 0.01
        y = x @ torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]]) + noise
        return {"mse": ((self.lin(x) - y) ** 2).mean(), "l2": 1e-3 * self.lin.weight.pow(2).sum()}


def _toy_run(work, steps, resume=False):
    torch.manual_seed(0)
    toy = Toy()
    cfg = TrainConfig(steps=steps, checkpoint_every=3, seed=1, warmup=2)
    result = train(toy, [{"params": list(toy.parameters()), "lr": 0.3}], cfg, work, resume,
                   progress=False)  # fmt: skip
    return toy, result


def test_trainer_checkpoints_and_resume_match_an_uninterrupted_run(tmp_path):
    full, result = _toy_run(tmp_path / "full", 8)
    assert result.history[-1]["mse"] < 0.5 * result.history[0]["mse"]
    # a run killed after step 6 (its last checkpoint), resumed to 8
    _toy_run(tmp_path / "cut", 6)
    info = load_checkpoint_info(tmp_path / "cut")
    assert info["step"] == 6 and (tmp_path / "cut" / info["tensors"]).is_file()
    assert len(list((tmp_path / "cut").glob("checkpoint-*.safetensors"))) == 1  # old ones pruned
    resumed, _ = _toy_run(tmp_path / "cut", 8, resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("full", "cut")]
    assert [r["step"] for r in rows[1]] == [str(s) for s in range(1, 9)]
    assert [r["mse"] for r in rows[0]] == [r["mse"] for r in rows[1]]


class Ramped(Toy):
    """A term that switches on at step 3, as a λ ramping up from 0."""

    def forward(self, step, rng, gen):
        terms = super().forward(step, rng, gen)
        if step < 3:
            del terms["l2"]
        return terms


def test_metrics_gain_a_column_when_a_term_switches_on(tmp_path):
    torch.manual_seed(0)
    ramped = Ramped()
    cfg = TrainConfig(steps=5, checkpoint_every=5)
    train(ramped, [{"params": list(ramped.parameters()), "lr": 0.1}], cfg, tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 5 and "l2" in rows[0]
    assert [r["l2"] == "" for r in rows] == [True, True, True, False, False]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        _toy_run(tmp_path / "none", 2, resume=True)


pytest.importorskip("anny", reason="finetune needs the Anny template")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    template_avatar(2000).save(folder / "t.avatar")
    write_wav(folder / "a.wav", speechlike(1.2).numpy())
    return folder


def score_distillation_distances(tiny, teacher: str, monkeypatch, steps: int = 4) -> list[float]:
    """λ_vsd alone with `teacher`, the same window, τ and ε every step: each step's distance of
    the frames' latents z to the first step's target z − w(ε̂ − ε). Descending it through the
    encoder, renderer and deformer must bring z closer to that target. (The teacher's residual
    itself need not fall, and with a random network it does not always: the score-distillation
    gradient leaves out the network's Jacobian.)"""
    import distill.score as score

    real, seen = score.score_distillation_loss, []

    def spy(latents, *args, **kwargs):
        loss = real(latents, *args, **kwargs)
        (grad,) = torch.autograd.grad(loss, latents, retain_graph=True)
        seen.append((latents.detach(), latents.detach() - len(latents) * grad))  # z, target
        return loss

    monkeypatch.setattr(score, "score_distillation_loss", spy)
    obj = _objective(tiny, "vsd", frames=4, teacher=teacher)
    opt = torch.optim.Adam(obj.param_groups())
    for step in range(steps):
        terms = obj(step, np.random.default_rng(0), torch.Generator().manual_seed(0))
        assert set(terms) == {"vsd"}
        opt.zero_grad()
        terms["vsd"].backward()
        opt.step()
    return [float((z - seen[0][1]).norm()) for z, _ in seen]


def _objective(tiny, only: str, frames: int = 3, teacher: str = "procedural"):
    """A one-camera, one-window scene (the same window every step) with one loss term on."""
    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver
    from avatar.pipelines.finetune import load_clips
    from distill.finetune import FinetuneConfig, FinetuneObjective
    from distill.scene import DistillScene, training_cameras
    from distill.teachers import make_teacher

    avatar = Avatar.load(tiny / "t.avatar")
    driver = Driver(avatar, DriveConfig(size=64, framing="face"))
    clips = load_clips([tiny / "a.wav"], 25.0)
    clips[0].samples = clips[0].samples[: int(16000 * frames / 25)]
    clips[0].num_frames = frames
    cams = training_cameras(driver.rig, 64)[:1]
    scene = DistillScene(driver.rig, clips, cams, 25.0)
    teach = make_teacher(teacher)
    teach.prepare(scene)
    lambdas = {f"lambda_{k}": "0" for k in ("vsd", "kpt", "img", "reg", "lips")}
    lambdas[f"lambda_{only}"] = "1"
    cfg = FinetuneConfig(frames=frames, lr=5e-4, lr_gaussians=0.0, arap_gaussians=256, **lambdas)
    return FinetuneObjective(driver.model, scene, teach, cfg)


@pytest.mark.parametrize("term", ["img", "kpt", "reg", "lips"])
def test_each_loss_decreases_when_optimised_alone(tiny, term):
    obj = _objective(tiny, term)
    opt = torch.optim.Adam(obj.param_groups())
    values = []
    for step in range(6):
        terms = obj(step, np.random.default_rng(0), torch.Generator().manual_seed(0))
        assert set(terms) == {term}
        values.append(float(terms[term].detach()))
        opt.zero_grad()
        terms[term].backward()
        opt.step()
    assert values[0] > 0 and min(values[3:]) < values[0], values


def test_a_frozen_template_head_poses_the_teacher_like_the_student(tiny):
    """The procedural teacher's skeleton is seeded noise that a frozen template head cannot
    follow: the teacher takes the student's bones, so only the face is compared."""
    obj = _objective(tiny, "kpt")
    window = obj.scene.sample_window(np.random.default_rng(0), 3)
    own = obj.teacher(obj.scene, window)
    motion = obj.motion(window, None)
    ours = obj.teacher(obj.scene, window, motion.bones.detach())
    assert torch.equal(ours.controls.bones, motion.bones.detach())
    assert torch.equal(ours.controls.actions, own.controls.actions)  # the face: the teacher's
    assert not torch.allclose(ours.keypoints, own.keypoints, atol=1e-3)
    seen, teacher = [], obj.teacher

    def spy(scene, w, bones=None):
        seen.append(bones)
        return teacher(scene, w, bones)

    obj.teacher = spy
    spy.aligned_windows, spy.score_loss = False, teacher.score_loss
    obj(0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert seen[0] is not None and not seen[0].requires_grad


def test_finetune_cli_writes_a_new_avatar_and_resumes(tiny, tmp_path):
    from avatar.asset import Avatar
    from deform.deformer import load_deformer

    args = ["finetune", str(tiny / "t.avatar"), "--audio", str(tiny / "a.wav"), "--steps", "2",
            "--size", "64", "--frames", "3", "--checkpoint-every", "1", "--arap-gaussians", "256",
            "-o", str(tmp_path / "tuned.avatar")]  # fmt: skip
    r = run_avatar(*args)
    assert r.returncode == 0, r.stderr
    assert "2 steps with the procedural teacher" in r.stdout
    tuned = Avatar.load(tmp_path / "tuned.avatar")
    shipped = load_deformer().state_dict()
    assert set(tuned.deformer) == set(shipped)
    assert any(not torch.equal(tuned.deformer[k], v) for k, v in shipped.items())
    assert tuned.meta["provenance"]["finetune"]["steps"] == 2
    work = tmp_path / "tuned.avatar.train"
    assert load_checkpoint_info(work)["step"] == 2
    rows = list(csv.DictReader(open(work / "metrics.csv")))
    assert {"img", "kpt", "reg", "total"} <= set(rows[0])
    # resume to 3 steps from the work directory
    r = run_avatar(*args[:-1], str(tmp_path / "more.avatar"), "--work", str(work), "--resume",
                   "--steps", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load_checkpoint_info(work)["step"] == 3
    # a different run may not continue from this work directory
    r = avatar_in_process(*args[:-1], str(tmp_path / "other.avatar"), "--work", str(work),
                          "--resume", "--steps", "4", "--lambda-img", "0.5")  # fmt: skip
    assert r.returncode != 0 and "different run" in r.stderr and "config" in r.stderr
    assert not (tmp_path / "other.avatar").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher", "magic"], "use procedural or diffusers:PATH"),
        (["--teacher", "diffusers:/nonexistent/model"], "teacher"),
        (["--steps", "0"], "at least 1"),
        (["--lambda-img", "lots"], "use 0.5"),
        (["--checkpoint-every", "0"], "at least 1"),
        (["--arap-gaussians", "3"], "at least 7"),
        (
            ["--steps", "1"] + [f"--lambda-{k}=0" for k in ("vsd", "kpt", "img", "reg", "lips")],
            "no loss term",
        ),
    ],
)
def test_finetune_bad_arguments(tiny, tmp_path, extra, message):
    out = tmp_path / "x.avatar"
    r = avatar_in_process("finetune", str(tiny / "t.avatar"), "--audio", str(tiny / "a.wav"),
                          "--size", "64", "-o", str(out), *extra)  # fmt: skip
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_finetune_bad_audio_and_avatar(tiny, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    out = tmp_path / "x.avatar"
    r = avatar_in_process("finetune", str(tiny / "t.avatar"), "--audio", str(bad), "-o", str(out))
    assert r.returncode != 0 and "bad.wav" in r.stderr and "Traceback" not in r.stderr
    r = avatar_in_process("finetune", str(tmp_path / "none.avatar"), "--audio", str(tiny / "a.wav"))
    assert r.returncode != 0 and "no such avatar" in r.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_finetune_under_torchrun_ddp_on_cpu(tiny, tmp_path):
    """Two Gloo processes: the same command as on K GPUs, one output written by rank 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc_per_node=2", "--master_port=29517", "-m", "avatar", "finetune",
           str(tiny / "t.avatar"), "--audio", str(tiny / "a.wav"), "--steps", "2", "--size", "64",
           "--frames", "3", "--arap-gaussians", "256", "-o", str(tmp_path / "ddp.avatar")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1
    assert load_checkpoint_info(tmp_path / "ddp.avatar.train")["step"] == 2


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_train_drive_runs_both_stages_and_resumes_after_stage_one(tmp_path):
    """The shipped checkpoint's command, tiny: supervised stage, then render-and-compare
    distillation over the bodies, which moves the motion heads and leaves the audio front-end
    and the template head as stage 1 left them; --resume skips a finished stage 1."""
    from safetensors.torch import load_file

    from deform.deformer import deformer_meta, load_deformer
    from distill.train_drive import STAGE1, main

    work, out = tmp_path / "work", tmp_path / "d.safetensors"
    tiny = ["--clips", "1", "--bodies", "2", "--gaussians", "1500", "--gaussian-batch", "128",
            "--batch", "1", "--window", "8", "--distill-gaussians", "2500", "--size", "48",
            "--work", str(work), "--out", str(out)]  # fmt: skip
    assert main(["--steps", "2", "--distill-steps", "2", *tiny]) == 0
    meta = deformer_meta(out)["training"]
    assert meta["steps"] == 2 and meta["distill"]["steps"] == 2
    assert set(meta["distill"]["loss_last"]) >= {"img", "kpt", "reg", "lips"}
    before, after = load_file(str(work / STAGE1)), load_file(str(out))
    same = {k for k in after if torch.equal(before[k], after[k])}
    assert all(
        k in same for k in after if k.split(".")[0] in ("audio", "controls", "visemes", "rnn")
    )
    assert not any(k in same for k in after if k.split(".")[0] in ("mlp_xi", "g_out"))
    load_deformer(out)  # loads as a drive checkpoint

    rows = (work / "metrics.csv").read_text().splitlines()
    assert main(["--steps", "2", "--distill-steps", "3", "--resume", *tiny]) == 0  # skips stage 1
    meta = deformer_meta(out)["training"]
    assert "init" not in meta and meta["steps"] == 2 and meta["distill"]["steps"] == 3
    assert (work / "metrics.csv").read_text().splitlines()[:3] == rows  # continued, not redone
    assert main(["--steps", "3", "--distill-steps", "3", "--resume", *tiny]) == 2  # other run
    assert main(["--steps", "2", "--resume", "--out", str(out)]) == 2  # --resume needs --work
    from deform.deformer import DEFAULT_CHECKPOINT

    shipped = DEFAULT_CHECKPOINT.read_bytes()  # never overwritten without --replace-shipped
    assert main(["--steps", "2", *tiny[:-2], "--out", str(DEFAULT_CHECKPOINT)]) == 2
    assert DEFAULT_CHECKPOINT.read_bytes() == shipped


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_train_drive_on_wav2vec_features(tmp_path):
    """--audio-encoder trains the adapter (wav2vec itself frozen) and both stages run; the
    checkpoint drives with that model, and the shipped log-mel file is never overwritten."""
    from safetensors.torch import load_file

    from deform.deformer import DEFAULT_CHECKPOINT, deformer_meta, load_deformer
    from distill.train_drive import main

    w2v, out = tiny_wav2vec(tmp_path / "w2v"), tmp_path / "w.safetensors"
    shipped = DEFAULT_CHECKPOINT.read_bytes()
    tiny = ["--clips", "1", "--bodies", "1", "--gaussians", "1500", "--gaussian-batch", "128",
            "--batch", "1", "--window", "8", "--distill-gaussians", "2500", "--size", "48",
            "--audio-encoder", str(w2v)]  # fmt: skip
    assert main(["--out", str(DEFAULT_CHECKPOINT), *tiny]) == 2  # the shipped one: refused
    assert main(["--steps", "3", "--distill-steps", "1", "--out", str(out), *tiny]) == 0
    assert DEFAULT_CHECKPOINT.read_bytes() == shipped
    assert deformer_meta(out)["training"]["audio_encoder"] == str(w2v.resolve())
    assert "audio.adapter.weight" in load_file(str(out))
    model = load_deformer(out)
    assert model.audio.kind == "wav2vec2" and model.audio.path == str(w2v.resolve())
    assert all(p.requires_grad for p in model.audio.adapter.parameters())
    assert not any(p.requires_grad for p in model.audio.model.parameters())
    template_avatar(1500).save(tmp_path / "t.avatar")  # and drives a video
    wav = write_wav(tmp_path / "s.wav", speechlike(0.4).numpy())
    res = run_avatar("drive", str(tmp_path / "t.avatar"), str(wav), "-o", str(tmp_path / "t.mp4"),
                     "--size", "64", "--deformer", str(out))  # fmt: skip
    assert res.returncode == 0 and (tmp_path / "t.mp4").is_file(), res.stderr[-2000:]
