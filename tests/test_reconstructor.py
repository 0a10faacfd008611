"""The LHM-style reconstructor: part masks and the Hand++ branch, inputs, checkpoints, a short
training run that learns, and `avatar create --refine-steps 0 / --reconstructor`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from reconstruct.network import (
    GROUPS,
    JointBlock,
    Reconstructor,
    ReconstructorConfig,
    attention_mask,
    load_reconstructor,
    part_groups,
)

pytest.importorskip("anny", reason="the reconstructor's inputs need the Anny template")

TINY = ReconstructorConfig(dim=32, heads=2, blocks=1, queries=96, body_size=64, part_size=32,
                           encoder_dim=32, encoder_layers=2)  # fmt: skip


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    from reconstruct.synthetic import make_dataset

    folder = tmp_path_factory.mktemp("recon_data")
    make_dataset(folder, 2, seed=3, num_gaussians=1500, size=96, progress=False)
    return folder


@pytest.fixture(scope="module")
def subject(subjects):
    from reconstruct.synthetic import load_subject

    return load_subject(subjects / "00000.safetensors")


def _inputs(s, cfg=TINY, **kw):
    from reconstruct.feedforward import prepare_inputs

    return prepare_inputs(s.template, s.binding, s.transforms, s.camera, s.image, s.mask, cfg, **kw)


def test_attention_mask_follows_part_groups_only():
    # queries: body, head, left hand, right hand; then one token of each image
    is_query = torch.tensor([True] * 4 + [False] * 4)
    group = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    m = attention_mask(is_query, group)
    assert m[:4, :4].all()  # queries attend to each other
    assert m[:4, 4].all()  # every query sees the body tokens
    assert m[:, 5].tolist() == [False, True, False, False, False, True, False, False]  # head
    assert m[:, 6].tolist() == [False, False, True, False, False, False, True, False]  # Hand++ L
    assert m[4, :4].all() and not m[4, 5:].any()  # body tokens: all queries, their own image
    # the mask is built from the groups, not from positions: a shuffled sequence permutes it
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(attention_mask(is_query[perm], group[perm]), m[perm][:, perm])


def test_hand_tokens_reach_only_their_hand_queries():
    torch.manual_seed(0)
    block = JointBlock(16, 2, 4).eval()
    groups = torch.tensor([0, 0, 1, 2, 2, 3, 3])
    queries, body = torch.randn(7, 16), torch.randn(5, 16)
    left, right = torch.randn(3, 16), torch.randn(3, 16)
    group = torch.cat(
        [groups, torch.zeros(5, dtype=torch.long), torch.full((3,), 2), torch.full((3,), 3)]
    )
    is_query = torch.arange(len(group)) < 7

    def run(left_tokens):
        seq = [(0, queries), (1, body), (3, left_tokens), (3, right)]
        return block(seq, attention_mask(is_query, group))[0][1]

    base, moved = run(left), run(left + torch.randn(3, 16))
    changed = (moved - base).abs().amax(1) > 1e-6
    assert changed.tolist() == (groups == 2).tolist()


def test_part_groups():
    from reconstruct.canonical import PART_CODES

    parts = torch.tensor([PART_CODES[k] for k in PART_CODES], dtype=torch.uint8)
    got = [GROUPS[g] for g in part_groups(parts)]
    assert got == ["body", "head", "head", "head", "hand_left", "hand_right", "head"]


def test_inputs_crops_and_hand_boxes(subject):
    from reconstruct.feedforward import cut_box

    inp = _inputs(subject)
    assert inp.body.shape == (3, 64, 64) and inp.head.shape == (3, 32, 32)
    assert sorted(inp.hands) == ["hand_left", "hand_right"]
    assert inp.uv.abs().max() <= 1.0 and 0.2 < inp.visible.mean() < 0.8
    assert len(inp.query_ids) >= TINY.queries and inp.knn_weights.sum(1).allclose(torch.ones(1500))
    for g in range(len(GROUPS)):  # every Gaussian reads queries of its own part
        own = inp.groups == g
        assert (inp.groups[inp.query_ids][inp.knn_ids[own]] == g).all()
    # left hands are mirrored; a given (MediaPipe) box replaces the template's
    img = torch.rand(40, 60, 3)
    assert torch.allclose(
        cut_box(img, (30, 20, 16), 16, mirror=True),
        cut_box(img, (30, 20, 16), 16).flip(-1),
        atol=1e-5,
    )
    box = (30.0, 40.0, 20.0)
    given = _inputs(subject, hand_boxes={"hand_left": box, "hand_right": box})
    on_white = subject.image * subject.mask[..., None] + (1 - subject.mask[..., None])
    assert torch.allclose(given.hands["hand_left"], cut_box(on_white, box, 32, mirror=True))
    assert torch.allclose(given.hands["hand_right"], cut_box(on_white, box, 32))
    other = _inputs(subject, hand_boxes={"hand_left": (10.0, 10.0, 12.0)})
    assert not torch.allclose(other.hands["hand_left"], inp.hands["hand_left"])
    assert torch.equal(other.hands["hand_right"], inp.hands["hand_right"])


def test_forward_starts_at_the_template_and_ablation_ignores_hands(subject):
    torch.manual_seed(0)
    inp = _inputs(subject)
    model = Reconstructor(TINY).eval()
    with torch.no_grad():
        g = model(inp)
    t = inp.template  # the template fitted to the photo's silhouette; D_G starts there (zero init)
    assert torch.equal(g.means, t.means) and torch.equal(g.log_scales, t.log_scales)
    moved = (t.means - subject.template.means).norm(dim=-1)  # loose clothes and hair: inflated
    assert moved.max() > 0.005
    assert torch.isfinite(g.sh).all() and g.sh.shape == (1500, 1, 3)

    no_hands = Reconstructor(ReconstructorConfig(**{**TINY.__dict__, "hand_branch": False})).eval()
    assert no_hands.hand_encoder is None
    other = _inputs(subject)
    other.hands = {k: torch.rand_like(v) for k, v in other.hands.items()}
    with torch.no_grad():
        assert torch.equal(no_hands.features(inp), no_hands.features(other))
        changed = (model.features(other) - model.features(inp)).abs().amax(1) > 1e-6
    assert changed[inp.groups >= 2].float().mean() > 0.9  # hands changed; Hand++ reads them


def test_gaussians_the_photo_sees_move_only_along_their_viewing_ray(subject):
    from deform.skinning import apply_blend
    from reconstruct.refine import posed_blend

    torch.manual_seed(0)
    model = Reconstructor(TINY).eval()
    torch.nn.init.normal_(model.decoder.net[-1].weight, std=0.5)  # a trained D_G moves them
    inp = _inputs(subject)
    with torch.no_grad():
        g = model(inp)
    blend = posed_blend(subject.binding, subject.transforms)
    where = [subject.camera.project(apply_blend(x, blend).means)[0] for x in (inp.template, g)]
    px = (where[1] - where[0]).norm(dim=-1)
    seen = inp.visible > 0.5
    assert (g.means - inp.template.means)[seen].norm(dim=-1).mean() > 0.005  # in depth
    assert px[seen].max() < 0.01 and px[~seen].mean() > 0.3  # the rest move freely


def test_checkpoint_round_trip_and_errors(tmp_path, subject):
    torch.manual_seed(0)
    model = Reconstructor(TINY)
    model.save(tmp_path / "tiny.safetensors", {"note": "test"})
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert doc["config"]["dim"] == 32 and doc["note"] == "test"
    loaded = load_reconstructor(tmp_path)  # a folder holding one pair works too
    inp = _inputs(subject)
    with torch.no_grad():
        assert torch.allclose(loaded(inp).sh, model.eval().half().float()(inp).sh, atol=1e-3)
    with pytest.raises(ValueError, match="missing.json|needs missing.json"):
        (tmp_path / "missing.safetensors").write_bytes(b"x")
        load_reconstructor(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "tiny.safetensors").read_bytes())
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "config": {**doc["config"], "dim": 48}}))
    with pytest.raises(ValueError, match="do not match the config"):
        load_reconstructor(tmp_path / "bad.safetensors")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable reconstructor"):
        load_reconstructor(tmp_path / "bad.safetensors")


def test_encoders_from_a_local_dinov2_folder(tmp_path, subject):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)  # fmt: skip
    cfg = ReconstructorConfig(**{**TINY.__dict__, "encoder_path": str(tmp_path)})
    model = Reconstructor(cfg)
    assert type(model.body_encoder.vit).__name__ == "Dinov2Model"
    assert model.body_encoder.grid == (8, 8)
    with torch.no_grad():
        assert torch.isfinite(model(_inputs(subject, cfg)).sh).all()


def test_training_learns_and_resumes_exactly(subjects, tmp_path):
    from distill.train_reconstructor import ReconObjective, ReconTrainConfig, sample_files
    from distill.trainer import TrainConfig, train

    def fit(steps, resume=False, work=tmp_path / "w"):
        torch.manual_seed(0)
        model = Reconstructor(TINY)
        obj = ReconObjective(
            model, sample_files(subjects), ReconTrainConfig(batch=1, render_size=48)
        )
        groups = [{"params": list(model.parameters()), "lr": 2e-3}]
        res = train(obj, groups, TrainConfig(steps=steps, checkpoint_every=10, warmup=1), work,
                    resume, progress=False)  # fmt: skip
        return model, res

    # bitwise equality needs one thread: with several, gradient sums (torch's scatter-adds,
    # the native rasteriser) vary in the last bits from run to run (README, "Trainer")
    numba = pytest.importorskip("numba")
    threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        model, res = fit(40)
        fit(30, work=tmp_path / "r")  # killed at step 30 (its checkpoint), then resumed
        resumed, _ = fit(40, resume=True, work=tmp_path / "r")
    finally:
        numba.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    first = np.mean([r["rgb"] for r in res.history[:5]])
    last = np.mean([r["rgb"] for r in res.history[-5:]])
    assert last < 0.85 * first, (first, last)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_train_script_bad_data_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "distill.train_reconstructor", "train", "--data",
                          str(tmp_path), "--out", str(tmp_path / "x.safetensors"), "--steps", "1"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 2 and "not a reconstructor dataset" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_multi_view_data_without_ground_truth_gaussians_trains(subject, tmp_path):
    """The data format's real-data variant: photos from other cameras instead of target.*."""
    from dataclasses import replace

    from distill.train_reconstructor import ReconObjective, ReconTrainConfig, posed, view_cameras
    from reconstruct.synthetic import Views, load_subject, save_subject
    from render import rasterize

    with torch.no_grad():
        truth = posed(subject.target, subject)
        cams = view_cameras(truth, (90.0, 180.0), 48)
        out = rasterize(truth, cams, background=1.0)
    views = Views(cams, out.rgb, out.alpha[..., 0])
    save_subject(tmp_path / "mv.safetensors", replace(subject, target=None, views=views))
    loaded = load_subject(tmp_path / "mv.safetensors")
    assert loaded.target is None and torch.equal(loaded.views.rgb, out.rgb)

    torch.manual_seed(0)
    model = Reconstructor(TINY)
    obj = ReconObjective(model, [tmp_path / "mv.safetensors"], ReconTrainConfig(batch=1))
    terms = obj(0, np.random.default_rng(0), torch.Generator())
    assert sorted(terms) == ["render"]
    terms["render"].backward()
    assert model.decoder.net[-1].weight.grad.abs().sum() > 0


def test_fit_silhouette_grows_and_shifts_the_template_to_the_photo_silhouette(subject):
    from deform.skinning import apply_blend
    from reconstruct.feedforward import fit_silhouette
    from reconstruct.refine import posed_blend
    from render import rasterize

    blend = posed_blend(subject.binding, subject.transforms)
    groups = part_groups(subject.binding.parts)

    def alpha(g):
        return rasterize(apply_blend(g, blend), subject.camera).alpha[0, ..., 0]

    own = alpha(subject.template)
    same = fit_silhouette(subject.template, groups, blend, subject.camera, own)
    assert (same.means - subject.template.means).norm(dim=-1).max() < 0.005

    wider = torch.nn.functional.max_pool2d(own[None, None], 7, 1, 3)[0, 0]  # 3 px all round
    grown = fit_silhouette(subject.template, groups, blend, subject.camera, wider, rounds=0)
    lift = (grown.means - subject.template.means).norm(dim=-1)
    assert lift.mean() > 0.005 and lift.max() <= 0.06 + 1e-6  # inflation alone: ≤ max_inflate
    assert (grown.log_scales >= subject.template.log_scales - 1e-6).all()

    # a photo whose person sits 4 px lower than the template (a fit that missed the feet)
    lower = torch.zeros_like(own)
    lower[4:] = own[:-4]

    def holes(g):
        return int(((lower > 0.5) & (alpha(g) < 0.5)).sum())

    moved = fit_silhouette(subject.template, groups, blend, subject.camera, lower)
    assert holes(moved) < 0.5 * holes(subject.template)
    assert (moved.means - subject.template.means).norm(dim=-1).max() <= 0.06 + 0.15 * 12 + 1e-6


def test_fit_silhouette_leaves_the_face_where_the_fit_put_it(subject):
    """A silhouette looser than the template all round (a collar, hair, a hat) moves the body's
    Gaussians to it and not the face's: the fit placed the face by its landmarks (a collar
    wider than the template's neck drew the demo's jaw 3-7 cm down onto her jacket)."""
    from deform.skinning import apply_blend
    from reconstruct.feedforward import fit_silhouette
    from reconstruct.network import GROUPS
    from reconstruct.refine import posed_blend
    from render import rasterize

    blend = posed_blend(subject.binding, subject.transforms)
    groups = part_groups(subject.binding.parts)
    own = rasterize(apply_blend(subject.template, blend), subject.camera).alpha[0, ..., 0]
    looser = torch.nn.functional.max_pool2d(own[None, None], 15, 1, 7)[0, 0]  # 7 px all round
    moved = fit_silhouette(subject.template, groups, blend, subject.camera, looser)
    shift = (moved.means - subject.template.means).norm(dim=-1)
    face = groups == GROUPS.index("head")
    assert face.any() and shift[~face].max() > 0.02
    assert shift[face].max() == 0


def test_silhouette_field_jacobian_is_exact():
    from reconstruct.feedforward import _lift, _smooth_field

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64) * 0.1
    blend = torch.eye(4, dtype=torch.float64).repeat(30, 1, 1)
    blend[:, :3] += 0.2 * torch.randn(30, 3, 4, generator=gen, dtype=torch.float64)
    ends = _lift(torch.randn(25, 3, generator=gen, dtype=torch.float64) * 0.1,
                 torch.eye(4, dtype=torch.float64).repeat(25, 1, 1))  # fmt: skip
    groups, end_groups = torch.arange(30) % 2, torch.arange(25) % 2
    values = torch.randn(25, 3, generator=gen, dtype=torch.float64)

    def field_sum(p):  # f_i depends on p_i alone, so the Jacobian of the sum holds every row
        return _smooth_field(p, blend, groups, ends, end_groups, values, 0.3)[0].sum(0)

    _, jac = _smooth_field(x, blend, groups, ends, end_groups, values, 0.3, jacobian=True)
    want = torch.autograd.functional.jacobian(field_sum, x).permute(1, 0, 2)
    assert jac.abs().max() > 1.0  # the anchors are within reach
    torch.testing.assert_close(jac, want)


def test_one_command_makes_data_trains_and_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "r.safetensors"
    res = subprocess.run([sys.executable, "-m", "distill.train_reconstructor", "train", "--data",
                          str(tmp_path / "new_data"), "--count", "2", "--steps", "2", "--batch", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "new_data" / "index.json").read_text())["count"] == 2
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["steps"] == 2 and "distill.train_reconstructor train" in doc["trained_with"]
    assert load_reconstructor(out).cfg.hand_branch


def test_personalising_the_decoder_fits_the_photo_and_leaves_the_model_alone(subject):
    from reconstruct.feedforward import personalise_decoder
    from reconstruct.losses import masked_quality
    from reconstruct.refine import RefineConfig, appearance_loss

    torch.manual_seed(0)
    model = Reconstructor(TINY).eval()
    inp = _inputs(subject)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    with torch.no_grad():
        features = model.features(inp)
        start = model.decoder(features, inp)
    objective = appearance_loss(start, subject.binding, subject.transforms, subject.camera,
                                subject.image, subject.mask, RefineConfig())  # fmt: skip
    tuned = personalise_decoder(model, inp, features, objective, 60, lr=3e-3, progress=False)
    with torch.no_grad():
        loss = [float(objective(g, g.means - inp.template.means)[0]) for g in (start, tuned)]
    assert loss[1] < 0.6 * loss[0]

    def quality(g):
        from deform.skinning import apply_blend
        from reconstruct.refine import posed_blend
        from render import rasterize

        with torch.no_grad():
            out = rasterize(apply_blend(g, posed_blend(subject.binding, subject.transforms)),
                            subject.camera, background=1.0)  # fmt: skip
        return masked_quality(out.rgb, subject.image[None], subject.mask[None, ..., None])[0]

    assert quality(tuned) > quality(start) + 0.5
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
