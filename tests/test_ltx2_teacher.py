"""The audio-conditioned teacher on a tiny random-weight LTX-2 folder built offline from configs."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
if not hasattr(diffusers, "LTX2ImageToVideoPipeline"):
    pytest.skip("this diffusers has no LTX-2 pipelines (0.42+)", allow_module_level=True)

from distill.diffusion_teacher import TeacherLoadError, load_teacher  # noqa: E402
from distill.ltx2_teacher import LTX2Teacher, log_mel, slaney_mel_filterbank  # noqa: E402
from distill.scene import Window  # noqa: E402
from distill.score import score_distillation_loss  # noqa: E402
from distill.teachers import window_audio  # noqa: E402

# Lightricks/LTX-2's scheduler_config.json (resolution-dependent exponential shift)
LTX2_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                      base_image_seq_len=1024, max_image_seq_len=4096)  # fmt: skip


def write_tiny_ltx2(root):
    """An LTX-2 image-to-video folder with random weights: 2x spatial and temporal VAE strides,
    a 4x audio VAE over 16 mel bins, a two-layer Gemma 3 with a word-level tokenizer."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<pad> <eos> <bos> <unk> a person talks to the camera ; lips , face and hands move "
    words += "with speech ."
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words.split())}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", model_max_length=16,
    )  # fmt: skip
    torch.manual_seed(0)
    text = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=dict(vocab_size=len(words.split()), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=64, sliding_window=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=2, eoi_token_index=1, image_token_index=3,
    ))  # fmt: skip
    transformer = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8,
        audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
        num_layers=2, caption_channels=32, rope_double_precision=False, rope_type="split",
    )  # fmt: skip
    connectors = LTX2TextConnectors(
        caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
        rope_theta=10000.0, rope_double_precision=False, causal_temporal_positioning=False,
        rope_type="split",
    )  # fmt: skip
    vae = diffusers.AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
        decoder_block_out_channels=(8,), layers_per_block=(1,), decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False), downsample_type=("spatiotemporal",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    audio_vae = diffusers.AutoencoderKLLTX2Audio(
        base_channels=8, output_channels=2, ch_mult=(1, 1, 1), num_res_blocks=1, in_channels=2,
        resolution=32, latent_channels=2, mel_bins=16,
    )  # fmt: skip
    pipe = diffusers.LTX2ImageToVideoPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**LTX2_SCHEDULER), vae=vae,
        audio_vae=audio_vae, text_encoder=text, tokenizer=tokenizer, connectors=connectors,
        transformer=transformer, vocoder=None,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def ltx2_dir(tmp_path_factory):
    return write_tiny_ltx2(tmp_path_factory.mktemp("ltx2"))


@pytest.fixture(scope="module")
def teacher(ltx2_dir):
    return load_teacher(ltx2_dir, device="cpu")


def reference() -> torch.Tensor:
    return torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A pitched buzz, amplitude-modulated at a syllable rate, with a random phase."""
    t = np.arange(int(16000 * seconds)) / 16000
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    return (
        0.3 * np.sin(2 * np.pi * 140 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + phase))
    ).astype(np.float32)


def test_load(teacher):
    assert isinstance(teacher, LTX2Teacher) and teacher.uses_audio
    assert teacher.prediction_type == "flow" and teacher.pipe.text_encoder is None
    assert (teacher.downsample, teacher.frames_multiple) == (2, 2)
    assert teacher.crf == 33  # a Gemma 3 generation: LTX-2's pipeline re-compresses at CRF 33
    assert not any(p.requires_grad for p in teacher.transformer.parameters())


def test_load_errors(tmp_path, ltx2_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ltx2_dir, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(TeacherLoadError, match="cannot load the LTX-2 pipeline"):
        load_teacher(broken)
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(TeacherLoadError, match="WanPipeline is not a supported teacher .*LTX2"):
        load_teacher(tmp_path)


def test_mel_front_end_matches_librosa():
    librosa = pytest.importorskip("librosa")
    ours = slaney_mel_filterbank(64).numpy().T
    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0, norm="slaney")
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    x = speech(0.5)
    mel = log_mel(x, 64, 2)
    spec = np.abs(librosa.stft(x, n_fft=1024, hop_length=160, center=True, pad_mode="reflect"))
    expect = np.log(np.maximum(ref @ spec, 1e-5)).T
    assert mel.shape == (1, 2, 51, 64) and torch.equal(mel[0, 0], mel[0, 1])
    np.testing.assert_allclose(mel[0, 0].numpy(), expect, atol=1e-2)  # fp32 near the 1e-5 floor
    loud = expect > -9
    np.testing.assert_allclose(mel[0, 0].numpy()[loud], expect[loud], atol=1e-3)


def test_window_audio_covers_the_reference_slot_and_the_window():
    samples = np.arange(16000, dtype=np.float32)
    first = window_audio(samples, 25.0, Window(0, 0, 8, None))
    assert len(first) == 9 * 640 and not first[:640].any() and first[640] == 0 and first[641] == 1
    later = window_audio(samples, 25.0, Window(0, 5, 8, None))
    assert later[0] == 4 * 640 and len(later) == 9 * 640


def test_the_speech_is_held_clean_and_the_reference_frame_too(teacher, monkeypatch):
    """The transformer sees the audio at timestep 0 and the reference's latent frame at 0, our
    frames at 1000·τ; the velocity it returns for our frames depends on the speech."""
    cond = teacher.condition(reference(), speech(0.4), num_frames=8, fps=25.0)
    x = torch.randn(1, 4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = {}
    real = teacher.transformer.forward

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(teacher.transformer, "forward", spy)
    v = teacher.predict(x, torch.tensor([0.3]), cond)
    assert v.shape == x.shape
    assert torch.equal(seen["audio_timestep"], torch.zeros(1))
    steps = seen["timestep"].reshape(1, 5, 16 * 16)  # [B, latent frames, cells]
    assert (steps[:, 0] == 0).all() and torch.allclose(steps[:, 1:], torch.tensor(300.0))
    assert seen["audio_hidden_states"].shape[1] == round(9 / 25 * 100 / 4)  # 25 latents a second
    other = teacher.condition(reference(), speech(0.4, seed=5), num_frames=8, fps=25.0)
    silent = teacher.condition(reference(), None, num_frames=8, fps=25.0)
    for c in (other, silent):
        assert not torch.allclose(teacher.predict(x, torch.tensor([0.3]), c), v, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 2 frames"):
        teacher.condition(reference(), None, num_frames=7)


def test_the_reference_is_h264_recompressed_as_in_ltx2s_pipeline(teacher, monkeypatch):
    ramp = torch.linspace(0.2, 0.8, 32)
    ref = torch.stack([ramp[:, None].expand(32, 32), ramp[None].expand(32, 32),
                       torch.full((32, 32), 0.5)], -1)  # fmt: skip
    ref[8:20, 10:22] = 0.9  # a smooth picture with one edge: H.264 keeps it, almost
    squeezed = teacher.condition(ref, None, num_frames=2).reference[0, :, 0]  # [3, H, W]
    assert 0 < (squeezed - (ref.permute(2, 0, 1) * 2 - 1)).abs().mean() < 0.05
    monkeypatch.setattr(teacher, "crf", 0)
    plain = teacher.condition(ref, None, num_frames=2).reference[0, :, 0]
    assert torch.allclose(plain, ref.permute(2, 0, 1) * 2 - 1)


def test_another_speech_keeps_the_references_part(teacher):
    """A teacher encodes each view's reference once and swaps the speech per window."""
    first = teacher.condition(reference(), speech(0.4), num_frames=8)
    other = teacher.with_audio(first, speech(0.4, seed=5), 8, 25.0)
    fresh = teacher.condition(reference(), speech(0.4, seed=5), num_frames=8)
    assert other.image_latents is first.image_latents
    assert torch.equal(other.audio_latents, fresh.audio_latents)
    assert not torch.equal(other.audio_latents, first.audio_latents)


def test_schedule_matches_the_pipelines_shifted_sigmas(teacher):
    z = torch.zeros(1, 4, 4, 16, 16)
    schedule = teacher.schedule_for(z)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**LTX2_SCHEDULER)
    tokens = 5 * 16 * 16
    mu = 0.95 + (2.05 - 0.95) * (tokens - 1024) / (4096 - 1024)
    u = np.linspace(1.0, 1 / 6, 6)
    scheduler.set_timesteps(sigmas=u, mu=mu)
    ours = schedule.tau_at(torch.from_numpy(u).float())
    assert torch.allclose(ours, scheduler.sigmas[:-1].float(), atol=1e-5)


def test_sampling_follows_the_velocity_to_its_target(teacher, monkeypatch):
    """With an oracle velocity toward fixed latents z* (v = (x − z*)/τ, exact for a point mass),
    `sample` must land on z* and decode it behind the reference."""
    cond = teacher.condition(reference(), None, num_frames=4)
    target = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(
        teacher, "predict", lambda x, tau, c: (x - target) / tau.view(-1, 1, 1, 1, 1)
    )
    clip = teacher.sample(reference(), 4, steps=5, seed=0)
    assert clip.shape == (4, 32, 32, 3)
    assert torch.allclose(clip, teacher.decode(target, cond), atol=1e-4)


def test_sample_is_deterministic_and_hears_the_speech(teacher):
    a = teacher.sample(reference(), 4, steps=2, seed=0, audio=speech(0.3))
    assert a.shape == (4, 32, 32, 3) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, teacher.sample(reference(), 4, steps=2, seed=0, audio=speech(0.3)))
    assert not torch.equal(a, teacher.sample(reference(), 4, steps=2, seed=0, audio=speech(0.3, 4)))


def test_score_distillation_reaches_rendered_frames(teacher):
    colour = torch.full((3,), 0.5, requires_grad=True)  # a stand-in for the avatar's parameters
    frames = reference()[None].repeat(4, 1, 1, 1) * colour
    cond = teacher.condition(reference(), speech(0.3), num_frames=4)
    z = teacher.encode(frames, cond)
    assert z.shape == (1, 4, 2, 16, 16)
    loss = score_distillation_loss(
        z, teacher.predict, teacher.schedule_for(z), prediction_type=teacher.prediction_type,
        guidance_scale=2.0, cond=cond, uncond=teacher.uncondition(cond),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(colour.grad).all() and colour.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from .helpers import finetune_folder

    return finetune_folder(tmp_path_factory.mktemp("finetune_ltx2"))


def test_score_distillation_alone_moves_the_frames_toward_the_teachers_target(tiny, ltx2_dir,
                                                                          monkeypatch):  # fmt: skip
    """As for SVD: descending λ_vsd alone brings the frames' latents toward the teacher's target."""
    from .test_distill import score_distillation_distances

    dist = score_distillation_distances(tiny, f"diffusers:{ltx2_dir}", monkeypatch)
    assert dist[0] > 0 and max(dist[1:]) < dist[0], dist


def test_finetune_cli_with_the_ltx2_teacher(tiny, ltx2_dir, tmp_path):
    from .test_drive import run_avatar

    args = ["finetune", str(tiny / "t.avatar"), "--audio", str(tiny / "a.wav"), "--teacher",
            f"diffusers:{ltx2_dir}", "--steps", "1", "--size", "64", "--arap-gaussians", "256",
            "-o", str(tmp_path / "ltx2.avatar")]  # fmt: skip
    r = run_avatar(*args, "--frames", "3")
    assert r.returncode != 0 and "multiple of 2 frames" in r.stderr and "Traceback" not in r.stderr
    r = run_avatar(*args, "--frames", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with the diffusers teacher" in r.stdout and "vsd" in r.stdout
