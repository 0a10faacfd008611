"""The diffusers teacher on a tiny random-weight Stable Video Diffusion built from configs."""

import json
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from distill.diffusion_teacher import DiffusionTeacher, TeacherLoadError, _weights_variant  # noqa: E402
from distill.score import NoiseSchedule, score_distillation_loss, to_epsilon  # noqa: E402

# stabilityai/stable-video-diffusion-img2vid-xt's scheduler_config.json
SVD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
    sigma_min=0.002, sigma_max=700.0, steps_offset=1, timestep_spacing="leading",
    timestep_type="continuous", use_karras_sigmas=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def svd_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, layers_per_block=1, cross_attention_dim=16,
        num_attention_heads=(2, 4), num_frames=4,
    )  # fmt: skip
    # 4 levels: 8 pixels per latent cell, as SVD's
    vae = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1,
    )  # fmt: skip
    clip = transformers.CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, image_size=32, patch_size=8,
    )  # fmt: skip
    encoder = transformers.CLIPVisionModelWithProjection(clip)
    root = tmp_path_factory.mktemp("svd")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    encoder.save_pretrained(root / "image_encoder")
    diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableVideoDiffusionPipeline"}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "feature_extractor").mkdir()
    stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(stats))
    return root


@pytest.fixture(scope="module")
def teacher(svd_dir):
    return DiffusionTeacher.load(svd_dir, device="cpu")


def reference() -> torch.Tensor:
    return torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))


def test_load(teacher):
    assert teacher.schedule.kind == "edm" and teacher.prediction_type == "v_prediction"
    assert teacher.schedule.sigma_max == 700.0 and not teacher.uses_audio
    assert teacher.unet.dtype == torch.float32 and not any(
        p.requires_grad for p in teacher.unet.parameters()
    )
    assert teacher.clip_std.flatten().tolist() == [0.25] * 3
    assert "torchvision" not in sys.modules


def test_load_errors(tmp_path):
    with pytest.raises(TeacherLoadError, match="no such teacher model directory"):
        DiffusionTeacher.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_index.json"):
        DiffusionTeacher.load(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(TeacherLoadError, match="StableDiffusionPipeline is not a supported"):
        DiffusionTeacher.load(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableVideoDiffusionPipeline"}')
    with pytest.raises(TeacherLoadError, match="cannot load"):
        DiffusionTeacher.load(tmp_path)


def test_weights_variant(tmp_path):
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").touch()
    assert _weights_variant(tmp_path) == "fp16"
    (tmp_path / "diffusion_pytorch_model.safetensors").touch()
    assert _weights_variant(tmp_path) is None


def test_encode_is_differentiable(teacher):
    frames = torch.rand(2, 64, 64, 3, requires_grad=True)
    latents = teacher.encode(frames)
    assert latents.shape == (1, 2, 4, 8, 8)
    latents.square().sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of 8"):
        teacher.encode(torch.rand(1, 60, 64, 3))


def test_score_distillation_reaches_rendered_frames(teacher):
    colour = torch.full((3,), 0.5, requires_grad=True)  # a stand-in for the avatar's parameters
    frames = reference()[None].repeat(4, 1, 1, 1) * colour  # [T, H, W, 3] "renders"
    cond = teacher.condition(reference(), audio=None)
    loss = score_distillation_loss(
        teacher.encode(frames), teacher.predict, teacher.schedule,
        prediction_type=teacher.prediction_type, guidance_scale=2.0, cond=cond,
        uncond=teacher.uncondition(cond), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(colour.grad).all() and colour.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not match"):
        teacher.predict(torch.zeros(1, 4, 4, 4, 4), torch.ones(1), cond)


def test_predict_matches_the_pipeline_step(teacher):
    """One step of SVD's own loop (scaled input, timestep 0.25·ln s) == predict + our ε̂ maths."""
    cond = teacher.condition(reference())
    scheduler = diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER)
    scheduler.set_timesteps(6)
    t = scheduler.timesteps[2]
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    x = scheduler.scale_model_input(latents, t)
    s = scheduler.sigmas[scheduler.step_index].view(1)
    unet_in = torch.cat([x, cond.image_latents[:, None].expand(1, 4, -1, -1, -1)], dim=2)
    out = teacher.unet(unet_in, t, cond.image_embeds, cond.added_time_ids, return_dict=False)[0]
    assert torch.allclose(teacher.predict(x, s, cond), out, atol=1e-5)
    z = scheduler.step(out, t, latents).pred_original_sample
    a, sig = teacher.schedule.alpha(s), teacher.schedule.sigma(s)
    eps = to_epsilon(out, x, a, sig, teacher.prediction_type)
    assert torch.allclose((x - sig * eps) / a, z, atol=1e-4)
    assert torch.allclose((latents - z) / s, eps, atol=1e-4)  # the Euler derivative is ε̂


def test_sample_is_deterministic(teacher):
    clip = teacher.sample(reference(), num_frames=4, steps=2, seed=0)
    assert clip.shape == (4, 64, 64, 3) and 0 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, teacher.sample(reference(), num_frames=4, steps=2, seed=0))
    assert not torch.equal(clip, teacher.sample(reference(), num_frames=4, steps=2, seed=1))


def check_step(schedule, scheduler, prediction_type, t, x, out, z_scheduler):
    tau = torch.as_tensor(t).view(1)
    a, s = schedule.alpha(tau), schedule.sigma(tau)
    eps = to_epsilon(out, x, a, s, prediction_type)
    z = (x - s * eps) / a
    assert torch.allclose(z, z_scheduler, atol=1e-4), prediction_type
    return z, eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_schedule_matches_ddpm(prediction_type):
    scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert schedule.kind == "vp" and torch.equal(schedule.alphas_cumprod, scheduler.alphas_cumprod)
    x, out = torch.randn(2, 1, 3, 4, 4), torch.randn(2, 1, 3, 4, 4)
    z = scheduler.step(out, 500, x).pred_original_sample
    check_step(schedule, scheduler, prediction_type, 500, x, out, z)


def test_flow_schedule_matches_flow_match_euler():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert schedule.kind == "flow" and schedule.shift == 3.0
    scheduler.set_timesteps(8)
    t = scheduler.timesteps[3]
    s, s_next = scheduler.sigmas[3], scheduler.sigmas[4]
    x, v = torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 3, 4, 4)
    z, eps = check_step(schedule, scheduler, "flow", s, x, v, x - s * v)
    # the Euler step moves along the straight line between ẑ and ε̂
    nxt = scheduler.step(v, t, x).prev_sample
    assert torch.allclose(nxt, (1 - s_next) * z + s_next * eps, atol=1e-5)


def test_unsupported_schedulers():
    with pytest.raises(ValueError, match="dynamic"):
        NoiseSchedule.from_scheduler(
            diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        )
    with pytest.raises(ValueError, match="EDM"):
        NoiseSchedule.from_scheduler(diffusers.EDMEulerScheduler())


# ---- the diffusers teacher inside avatar finetune ---------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from .helpers import finetune_folder

    return finetune_folder(tmp_path_factory.mktemp("finetune_svd"))


def test_score_distillation_alone_moves_the_frames_toward_the_teachers_target(tiny, svd_dir,
                                                                          monkeypatch):  # fmt: skip
    from .test_distill import score_distillation_distances

    dist = score_distillation_distances(tiny, f"diffusers:{svd_dir}", monkeypatch)
    assert dist[0] > 0 and max(dist[1:]) < dist[0], dist


def test_finetune_cli_with_a_diffusers_teacher(tiny, svd_dir, tmp_path):
    from distill.trainer import load_checkpoint_info

    from .test_drive import run_avatar

    out = tmp_path / "svd.avatar"
    r = run_avatar("finetune", str(tiny / "t.avatar"), "--audio", str(tiny / "a.wav"), "--teacher",
                   f"diffusers:{svd_dir}", "--steps", "1", "--size", "64", "--frames", "4",
                   "--arap-gaussians", "256", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with the diffusers teacher" in r.stdout and "vsd" in r.stdout
    assert load_checkpoint_info(tmp_path / "svd.avatar.train")["step"] == 1


def test_hands_are_bound_by_place_and_left_out_with_a_frozen_skeleton(tiny, svd_dir, monkeypatch):
    """MediaPipe hands (faked here at the hands' projections, listed right first) are bound to
    the side whose Gaussians project there, whatever the detections' order; in the teacher's
    frames each hand's keypoints are its own detection; a frozen skeleton (`bones`) drops them."""
    import numpy as np

    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver
    from avatar.pipelines.finetune import load_clips
    from distill import teachers
    from distill.scene import DistillScene, Window, training_cameras
    from reconstruct.canonical import PART_CODES

    driver = Driver(Avatar.load(tiny / "t.avatar"), DriveConfig(size=64, framing="face"))
    cams = training_cameras(driver.rig, 64)[3:]  # the upper body, hands in view
    scene = DistillScene(driver.rig, load_clips([tiny / "a.wav"], 25.0), cams, 25.0)
    parts = driver.rig.parts.long()
    sides = [torch.nonzero(parts == PART_CODES[f"hand_{s}"]).flatten() for s in ("left", "right")]
    with torch.no_grad():
        uv = [cams[0].project(driver.rig.still().means[ids[:21]])[0].double().numpy()
              for ids in sides]  # fmt: skip
    fake = [uv[1] + 0.5, uv[0] - 0.5]
    monkeypatch.setattr(teachers, "hand_detections", lambda frames: [fake for _ in frames])
    teacher = teachers.make_teacher(f"diffusers:{svd_dir}")
    teacher.prepare(scene)
    ids = teacher.hand_ids[0]
    assert torch.isin(ids[0], sides[0]).all() and torch.isin(ids[1], sides[1]).all()

    clip = teacher(scene, Window(0, 0, 2, cams[0], 0))
    hand = clip.keypoint_hand
    assert int(hand.sum()) == 42 and clip.visible[:, hand].all()
    got = clip.keypoints[:, hand].double().numpy()
    np.testing.assert_allclose(got[:, :21], np.broadcast_to(uv[0] - 0.5, (2, 21, 2)), atol=1e-3)
    np.testing.assert_allclose(got[:, 21:], np.broadcast_to(uv[1] + 0.5, (2, 21, 2)), atol=1e-3)
    frozen = teacher(scene, Window(0, 0, 2, cams[0], 0), bones=torch.zeros(2, 1, 3))
    assert not frozen.keypoint_hand.any() and len(frozen.keypoint_ids) == int((~hand).sum())
