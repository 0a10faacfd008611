"""The audio-driven deformer: speech -> template controls, particle twists, Gaussian residuals.

Per video frame t (all of it causal, with the audio encoder's fixed look-ahead):

    x_t   = PE(t) ⊕ A_t
    γ_t   = σ(MLP_γ(x_t))                                      (1 when there is no transcript)
    D_t   = γ_t · Proj_a(x_t) + (1 − γ_t) · Pool(Proj_z(Z))        Z: transcript tokens
    K     = Proj_K([Q ∥ Q0]),  V = Proj_V([Q ∥ Q0])               per particle; static per avatar
    H_t   = softmax((Proj_Q(D_t) + Proj_P(Q0)) Kᵀ / √d) V           M queries, one per particle
    Δξ_mt = MLP_ξ(H_t[m] ⊕ D_t ⊕ s(T_m,t−1))  ∈ R⁶,   T_m,t = exp(Δξ̂_mt) · T_m,t−1
    H^gau = CrossAttn(Q_n, [D_t−W+1 .. D_t])     per Gaussian n that the face's expressions move
    Δp, Δs, Δα, Δc = heads(H^gau),   Δp += B_n · lips_t
    B_n   = MLP_B(PE((a_n − c) / r) ⊕ part_n) · (1 − |a_n − c|² / (R r)²)₊²      [3, L]
    lips_t = close(sharpen_k(softmax(visemes(GRU(D_≤t)))), jaw_t) · VISEME_LIPS   L fine lip
             actions; p^k/Σp^k; `close`: the closed shape's weight at most (jaw_t + g + c)/0.6
             (`controls.close_on_jaw`: its lips travel as far as jawOpen_t parts them, and the
             photo's own gap g, `AvatarTokens.lips_apart`)
    controls_t = Linear(GRU(D_≤t))                                template bones + large actions
    bones_t   = bones_t−1 + r_t · (raw_t − bones_t−1),  r_t = r_pause + (r_speak − r_pause) · a_t
               a_t ∈ [0, 1]: speech activity (300-3000 Hz loudness against its running peak)

Q are the avatar's Gaussian query tokens (an MLP of each Gaussian's canonical position, part and
colour), pooled per particle for the keys; B_n is each Gaussian's own lip basis, read from where
it sits on the template relative to the mouth (a_n: its anchor, `SpeechRig.anchors`; c: the lip
particles' centre, r = `lip_extent`, fading out by R = `lip_reach` of them) and its part, never
its colour, so a lip moves the same on every face;
Q0 the template's query tokens (an MLP of each particle's canonical position and part). Proj_Q
acts on D_t; each particle adds its own template token so the M queries differ. s(T) =
(vee(R − Rᵀ)/2, translation) tells MLP_ξ where the particle already is, so the recurrence can
return to rest instead of drifting.

Drive and fine-tuning run the Gaussian head on the Gaussians the face's expressions move
(`SpeechRig.moving`, `gaussian_ids`; `Motion.spread` lays the residuals out over all of them,
zero elsewhere): the part of the body speech drives, a seventh of an avatar's Gaussians. On the
rest the shipped head's residuals were at most 0.1 mm (Δp), 0.0001 (Δc) and 0.005 (Δα, a logit),
and computing them took 70% of the deformer's time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from render.profiling import stage

from .audio_features import band_loudness, make_audio_encoder
from .controls import (
    DRIVEN_BONES,
    DRIVEN_HEAD,
    LIPS_MEET,
    PARTICLE_ACTIONS,
    TEMPLATE_ACTIONS,
    VISEMES,
    close_on_jaw,
    lip_actions,
    viseme_basis,
)
from .se3 import exp as se3_exp

NUM_PARTS = 7  # reconstruct.canonical.PART_CODES
LIP_PART = 2  # its "lips"


@dataclass(frozen=True)
class DeformerConfig:
    dim: int = 64  # driving token / attention width
    audio_dim: int = 128
    time_freqs: int = 16  # PE(t) frequencies, 0.25..12.5 Hz
    text_dim: int = 64
    heads: int = 4
    gauss_dim: int = 32  # Gaussian-head width
    window: int = 8  # driving tokens the Gaussian head attends over
    twist_scale: float = 0.02  # Δξ per frame: radians and metres
    offset_scale: float = 0.003  # Δp, metres
    lip_scale: float = 0.01  # Δp per unit of a lip action through a Gaussian's lip basis, metres
    lip_extent: float = 0.05  # r: the unit of the lip basis's mouth-relative coordinates, metres
    lip_reach: float = 2.5  # R: the lip basis fades to zero this many units from the mouth
    lip_freqs: int = 6  # PE frequencies of those coordinates (finest wavelength r / 32)
    viseme_sharpness: float = 3.0  # k: the lips make the shape of p^k / Σ p^k, not of p
    bone_smoothing: float = 0.1  # causal exponential smoothing of arm rotations (1: none)
    head_smoothing: float = 0.1  # the same for head, neck and chest (slow, calm)
    pause_smoothing: float = 0.005  # the rate for every driven bone in pauses (no speech)
    audio_encoder: str | None = None  # a wav2vec 2.0 directory, or None for log-mel

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def position_encoding(x: Tensor, freqs: int = 6) -> Tensor:  # [..., 3] metres -> [..., 3+6F]
    bands = (2.0 ** torch.arange(freqs, dtype=x.dtype, device=x.device)) * math.pi
    xb = x[..., None] * bands  # [..., 3, F]
    return torch.cat([x, xb.sin().flatten(-2), xb.cos().flatten(-2)], -1)


def time_encoding(t_seconds: Tensor, freqs: int) -> Tensor:  # [T] -> [T, 2F]
    hz = torch.logspace(
        math.log10(0.25), math.log10(12.5), freqs, dtype=t_seconds.dtype, device=t_seconds.device
    )
    ang = 2 * math.pi * t_seconds[:, None] * hz
    return torch.cat([ang.sin(), ang.cos()], -1)


# speech activity: loudness against its running peak (a 5 s decay, never below -40 dBFS), held
# for 0.12 s after it drops so the gaps between syllables do not count as pauses
ACTIVITY_RANGE = (0.1, 0.3)  # fraction of the peak: silent below, speaking above
LOUDNESS_FLOOR = 0.01
PEAK_DECAY_S = 5.0
RELEASE_S = 0.12


def speech_activity(
    loudness: Tensor, fps: float, ref: float = 0.0, last: float = 0.0
) -> tuple[Tensor, float, float]:
    """Per-frame activity in [0, 1] from speech-band loudness [T], causally, against a running
    peak `ref`; `last` is the previous frame's activity. Returns the activity, then the new
    `ref` and `last` to carry to the next chunk."""
    decay, (lo, hi) = math.exp(-1.0 / (fps * PEAK_DECAY_S)), ACTIVITY_RANGE
    out = torch.empty_like(loudness)
    for i, e in enumerate(loudness.tolist()):
        ref = max(ref * decay, e, LOUDNESS_FLOOR)
        now = min(max((e / ref - lo) / (hi - lo), 0.0), 1.0)
        last = out[i] = max(now, last - 1.0 / (RELEASE_S * fps))
    return out, ref, last


def mlp(inp: int, hidden: int, out: int, zero_last: bool = False) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, out))
    if zero_last:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


def sharpened(p: Tensor, k: float) -> Tensor:  # [..., V] probabilities -> p^k / Σ p^k
    """Probabilities sharpened towards their most likely entry (k > 1; k = 1: unchanged)."""
    return torch.softmax(k * torch.log(p.clamp_min(1e-12)), -1)


def state_feature(t: Tensor) -> Tensor:  # [..., 4, 4] -> [..., 6]: (vee(R - Rᵀ)/2, translation)
    r = t[..., :3, :3]
    skew = (r - r.transpose(-1, -2)) / 2
    vee = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], -1)
    return torch.cat([vee, t[..., :3, 3]], -1)


@dataclass
class AvatarTokens:
    """Per-avatar quantities the deformer precomputes once."""

    keys: Tensor  # [M, d]
    values: Tensor  # [M, d]
    particle_queries: Tensor  # [M, d]  Proj_P(Q0)
    gauss_queries: Tensor  # [N, g]  per-Gaussian query tokens (projected)
    lip_bases: Tensor  # [N, 3 * L]  B_n, each Gaussian's lip basis (flattened)
    lips_apart: float = 0.0  # the lips' gap at rest, in units of mouthClose (`close_on_jaw`)


@dataclass
class DeformerState:
    """What carries from one streamed chunk to the next."""

    transforms: Tensor  # [M, 4, 4] particle transforms T_{m, t-1}
    hidden: Tensor | None  # GRU state of the template head
    window: Tensor  # [W-1, d] previous driving tokens
    frame: int  # next frame index
    bones: Tensor | None = None  # [3B] last smoothed bone rotations
    activity: tuple[float, float] = (0.0, 0.0)  # `speech_activity`'s running peak and last value


@dataclass
class Motion:
    """The deformer's output for T frames."""

    controls: Tensor  # [T, B*3 + A]: driven-bone deltas, then TEMPLATE_ACTIONS weights
    particles: Tensor  # [T, M, 4, 4] particle transforms
    offsets: Tensor  # [T, N, 3] Δp
    log_scales: Tensor  # [T, N, 3] Δs
    opacity: Tensor  # [T, N] Δα (logits)
    color: Tensor  # [T, N, 3] Δc (rgb)
    gate: Tensor  # [T] γ_t
    visemes: Tensor  # [T, V] the probability of each mouth shape (controls.VISEMES)
    lips: Tensor  # [T, L] the fine lip actions they make (PARTICLE_ACTIONS weights)

    @property
    def bones(self) -> Tensor:  # [T, B, 3]
        return self.controls[:, : 3 * len(DRIVEN_BONES)].reshape(len(self.controls), -1, 3)

    @property
    def actions(self) -> Tensor:  # [T, A] in [0, 1]
        return self.controls[:, 3 * len(DRIVEN_BONES) :]

    def spread(self, ids: Tensor, num: int) -> Motion:
        """This motion's Gaussian residuals, computed for the Gaussians `ids` [n] only (the
        `gaussian_ids` of `SpeechDeformer.forward`), laid out over all `num` Gaussians: zero for
        the others. Differentiable."""

        def full(x: Tensor) -> Tensor:
            out = x.new_zeros(x.shape[0], num, *x.shape[2:])
            return out.index_copy(1, ids, x)

        return Motion(self.controls, self.particles, full(self.offsets), full(self.log_scales),
                      full(self.opacity), full(self.color), self.gate, self.visemes, self.lips)  # fmt: skip

    def without_particles(self) -> Motion:
        """The same bones and template actions with still particles (identity transforms) and
        no Gaussian residuals: the paper's ablation of driving the Gaussians directly."""
        eye = torch.eye(4, dtype=self.particles.dtype, device=self.particles.device)
        eye = eye.expand_as(self.particles)
        return Motion(self.controls, eye, torch.zeros_like(self.offsets),
                      torch.zeros_like(self.log_scales), torch.zeros_like(self.opacity),
                      torch.zeros_like(self.color), self.gate, self.visemes, self.lips)  # fmt: skip


GAUSS_BLOCK = 2048  # Gaussians per block of the Gaussian head when no gradient is needed


class SpeechDeformer(nn.Module):
    def __init__(self, cfg: DeformerConfig = DeformerConfig()):
        super().__init__()
        self.cfg = cfg
        d, g = cfg.dim, cfg.gauss_dim
        self.audio = make_audio_encoder(cfg.audio_encoder, cfg.audio_dim)
        x_dim = 2 * cfg.time_freqs + cfg.audio_dim
        self.proj_a = nn.Linear(x_dim, d)
        self.gate = mlp(x_dim, d, 1)
        self.text = nn.Embedding(256, cfg.text_dim)  # UTF-8 bytes
        self.proj_z = nn.Linear(cfg.text_dim, d)
        # template head: bones and large facial actions, smooth in time
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.n_controls = 3 * len(DRIVEN_BONES) + len(TEMPLATE_ACTIONS)
        self.controls = nn.Linear(d, self.n_controls)
        # ... and which mouth shape is heard: probabilities over VISEMES, whose fine lip
        # actions (controls.VISEME_LIPS) the particles and the Gaussians' lip bases make
        self.visemes = nn.Linear(d, len(VISEMES))
        self.register_buffer("viseme_lips", viseme_basis(), persistent=False)
        self.register_buffer("lips_meet", lip_actions(LIPS_MEET), persistent=False)
        # query tokens
        pe_dim = 3 + 6 * 6
        self.gauss_token = mlp(pe_dim + NUM_PARTS + 3, d, d)  # Q
        self.template_token = mlp(pe_dim + NUM_PARTS, d, d)  # Q0
        # motion head
        self.proj_k = nn.Linear(2 * d, d)
        self.proj_v = nn.Linear(2 * d, d)
        self.proj_q = nn.Linear(d, d)
        self.proj_p = nn.Linear(d, d)
        self.mlp_xi = mlp(2 * d + len(PARTICLE_ACTIONS) + 6, d, 6, zero_last=True)
        # Gaussian head
        self.gq = nn.Linear(d, g)
        self.gk = nn.Linear(d, g)
        self.gv = nn.Linear(d, g)
        self.g_hidden = nn.Sequential(nn.Linear(g, g), nn.GELU())
        self.g_out = nn.ModuleDict({k: nn.Linear(g, n) for k, n in
                                    (("p", 3), ("s", 3), ("a", 1), ("c", 3))})  # fmt: skip
        for lin in self.g_out.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        # each Gaussian's own lip basis B_n [3, L] (Δp_lips = B_n · lips_t), from where it sits
        # relative to the mouth and its part
        self.lip_basis = mlp(3 + 6 * cfg.lip_freqs + NUM_PARTS, d, 3 * len(PARTICLE_ACTIONS),
                             zero_last=True)  # fmt: skip

    # ---- per avatar --------------------------------------------------------------------------
    def avatar_tokens(
        self,
        means: Tensor,  # [N, 3] canonical
        parts: Tensor,  # [N] part codes
        colors: Tensor,  # [N, 3] rgb
        particle_rest: Tensor,  # [M, 3]
        particle_parts: Tensor,  # [M]
        particle_ids: Tensor,  # [N, K]
        particle_weights: Tensor,  # [N, K]
        anchors: Tensor | None = None,  # [N, 3] where each sits on the template (default: means)
    ) -> AvatarTokens:
        onehot = nn.functional.one_hot(parts.long(), NUM_PARTS).to(means.dtype)
        q = self.gauss_token(torch.cat([position_encoding(means), onehot, colors], -1))  # [N, d]
        m = len(particle_rest)
        # pool Gaussian tokens per particle by binding weight
        w = particle_weights.reshape(-1)
        pooled = q.new_zeros(m, q.shape[1]).index_add_(
            0, particle_ids.reshape(-1), q.repeat_interleave(particle_ids.shape[1], 0) * w[:, None]
        )
        mass = q.new_zeros(m).index_add_(0, particle_ids.reshape(-1), w)
        pooled = pooled / mass.clamp_min(1e-6)[:, None]
        p_onehot = nn.functional.one_hot(particle_parts.long(), NUM_PARTS).to(means.dtype)
        q0 = self.template_token(torch.cat([position_encoding(particle_rest), p_onehot], -1))
        kv_in = torch.cat([pooled, q0], -1)
        return AvatarTokens(self.proj_k(kv_in), self.proj_v(kv_in), self.proj_p(q0), self.gq(q),
                            self.lip_bases(means if anchors is None else anchors, onehot,
                                           particle_rest, particle_parts))  # fmt: skip

    def lip_bases(self, means: Tensor, onehot: Tensor, particle_rest: Tensor,
                  particle_parts: Tensor) -> Tensor:  # fmt: skip
        """B_n [N, 3 * L] (module docstring) at `means`: the Gaussians' places on the template
        (`SpeechRig.anchors`), not where the reconstruction moved them (up to a centimetre
        from them, more than a lip's height: read there, an upper lip's Gaussian took the lower
        lip's motion and the lips met as the jaw opened). The mouth's centre c is the lip
        particles' (the lip Gaussians' when there are no lip particles)."""
        cfg = self.cfg
        on_lips = particle_parts == LIP_PART
        centre = (particle_rest[on_lips].mean(0) if on_lips.any()
                  else means[onehot[:, LIP_PART] > 0].mean(0) if onehot[:, LIP_PART].any()
                  else means.mean(0))  # fmt: skip
        rel = (means - centre) / cfg.lip_extent
        taper = (1 - rel.pow(2).sum(-1) / cfg.lip_reach**2).clamp_min(0).pow(2)
        return self.lip_basis(torch.cat([position_encoding(rel, cfg.lip_freqs), onehot], -1)) \
            * taper[:, None]  # fmt: skip

    def start(self, tokens: AvatarTokens) -> DeformerState:
        m = tokens.keys.shape[0]
        eye = torch.eye(4, dtype=tokens.keys.dtype, device=tokens.keys.device)
        eye = eye.expand(m, 4, 4).clone()
        window = tokens.keys.new_zeros(self.cfg.window - 1, self.cfg.dim)
        return DeformerState(eye, None, window, 0)

    # ---- per chunk ---------------------------------------------------------------------------
    def transcript_embedding(self, transcript: str | None) -> Tensor | None:
        if not transcript or not transcript.strip():
            return None
        ids = torch.tensor(
            list(transcript.strip().encode("utf-8"))[:2048], device=self.proj_z.weight.device
        )
        return self.proj_z(self.text(ids)).mean(0)  # Pool(Proj_z(Z)) [d]

    def driving_tokens(
        self, audio_tokens: Tensor, first_frame: int, fps: float, text: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """D_t [T, d] and γ_t [T] from audio tokens A_t [T, audio_dim]."""
        t = first_frame + torch.arange(
            len(audio_tokens), dtype=audio_tokens.dtype, device=audio_tokens.device
        )
        t = t / fps
        x = torch.cat([time_encoding(t, self.cfg.time_freqs), audio_tokens], -1)
        if text is None:
            gamma = x.new_ones(len(x))
            return self.proj_a(x), gamma
        gamma = torch.sigmoid(self.gate(x))[:, 0]
        return gamma[:, None] * self.proj_a(x) + (1 - gamma[:, None]) * text, gamma

    def gaussian_head(
        self, keys: Tensor, values: Tensor, queries: Tensor, lips: Tensor, lip_bases: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Δp [T, n, 3], Δs [T, n, 3], Δα [T, n], Δc [T, n, 3] of the Gaussians whose query
        tokens are `queries` [n, g] and lip bases `lip_bases` [n, 3 L], from the window's keys
        and values [T, W, g] and the lip actions [T, L]."""
        cfg = self.cfg
        # attention weights laid out [T, W, n]: the softmax then runs across contiguous rows of
        # n (vectorised), not over runs of W = 8 (2.4x faster on a CPU; the same numbers)
        att = torch.softmax(keys @ queries.T, 1)  # [T, W, n]
        hg = self.g_hidden(att.transpose(1, 2) @ values)  # [T, n, g]
        outs = self.g_out.values()  # the four output layers as one product over hg
        fused = nn.functional.linear(hg, torch.cat([lin.weight for lin in outs]),
                                     torch.cat([lin.bias for lin in outs]))  # fmt: skip
        res = dict(zip(self.g_out, fused.split([lin.out_features for lin in outs], -1),
                       strict=True))  # fmt: skip
        basis = lip_bases.unflatten(-1, (3, len(PARTICLE_ACTIONS)))  # [n, 3, L]
        lip_offsets = torch.einsum("nkl,tl->tnk", basis, lips) * cfg.lip_scale
        return (res["p"] * cfg.offset_scale + lip_offsets, 0.1 * torch.tanh(res["s"]),
                res["a"][..., 0], 0.1 * torch.tanh(res["c"]))  # fmt: skip

    def forward(
        self,
        samples: Tensor,  # [S] 16 kHz audio (the whole file, or enough around the chunk)
        tokens: AvatarTokens,
        state: DeformerState,
        num_frames: int,
        fps: float,
        text: Tensor | None = None,
        gaussian_ids: Tensor | None = None,  # evaluate the Gaussian head on these only
        closed: Tensor | None = None,  # [T] in [0, 1]: how far the lips meet (a listener's)
    ) -> tuple[Motion, DeformerState]:
        """The next `num_frames` frames after `state`; returns the motion and the new state.
        `closed` c_t (a listener's): lips_t = (1 − c_t)·lips_t + c_t·`controls.LIPS_MEET`, which
        the particles and the lip bases make as they make any lip shape."""
        cfg = self.cfg
        start = state.frame
        with stage("audio"):
            audio = self.audio.encode(samples, start, start + num_frames, fps)
        drive, gamma = self.driving_tokens(audio, start, fps, text)  # [T, d]

        out, hidden = self.rnn(drive[None], state.hidden)
        controls = self.controls(out[0])
        visemes = torch.softmax(self.visemes(out[0]), -1)  # [T, V]
        n_bones = 3 * len(DRIVEN_BONES)
        bones = controls[:, :n_bones]
        # causal smoothing of the pose: no jitter while speaking, and in pauses the pose
        # settles slowly (rate `pause_smoothing`) instead of snapping back to rest
        loudness = torch.from_numpy(
            np.nan_to_num(band_loudness(samples, fps, start, start + num_frames))
        ).float()
        activity, ref, last = speech_activity(loudness, fps, *state.activity)
        speaking = bones.new_full((n_bones,), cfg.bone_smoothing)
        speaking[: 3 * DRIVEN_HEAD] = cfg.head_smoothing
        prev, rows = state.bones if state.bones is not None else bones[0], []
        for row, act in zip(bones, activity.tolist(), strict=True):
            rate = cfg.pause_smoothing + (speaking - cfg.pause_smoothing) * act
            prev = prev + rate * (row - prev)
            rows.append(prev)
        bones = torch.stack(rows)
        controls = torch.cat([bones, torch.sigmoid(controls[:, n_bones:])], -1)
        jaw = controls[:, n_bones + TEMPLATE_ACTIONS.index("jawOpen")]
        shapes = close_on_jaw(sharpened(visemes, cfg.viseme_sharpness), jaw, tokens.lips_apart)
        lips = shapes @ self.viseme_lips  # [T, L]
        if closed is not None:
            c = closed.to(lips)[:, None]
            lips = (1 - c) * lips + c * self.lips_meet

        # motion head: all frames' attention at once, then the recurrence
        heads, d = cfg.heads, cfg.dim
        q = self.proj_q(drive)[:, None] + tokens.particle_queries[None]  # [T, M, d]

        def heads_first(x: Tensor) -> Tensor:  # [..., L, d] -> [..., heads, L, d/heads]
            return x.unflatten(-1, (heads, d // heads)).transpose(-3, -2)

        # keys and values expanded over the frames (a view): with equal batch dims the CPU uses
        # its fused attention kernel, about 10x faster than the broadcasting math path
        keys, values = (heads_first(x).expand(num_frames, -1, -1, -1)
                        for x in (tokens.keys, tokens.values))  # fmt: skip
        h = nn.functional.scaled_dot_product_attention(heads_first(q), keys, values)
        h = h.transpose(-3, -2).flatten(-2)  # [T, M, d]
        transforms, steps = state.transforms, []
        for i in range(num_frames):
            inp = torch.cat([h[i], drive[i].expand(len(h[i]), d),
                             lips[i].expand(len(h[i]), -1), state_feature(transforms)], -1)  # fmt: skip
            xi = self.mlp_xi(inp) * cfg.twist_scale
            transforms = se3_exp(xi) @ transforms
            steps.append(transforms)
        particles = torch.stack(steps)

        # Gaussian head over a causal window of driving tokens
        window = torch.cat([state.window, drive], 0)  # [W-1+T, d]
        win = window.unfold(0, cfg.window, 1).transpose(-1, -2)  # [T, W, d]
        gq, gb = tokens.gauss_queries, tokens.lip_bases
        if gaussian_ids is not None:
            gq, gb = gq[gaussian_ids], gb[gaussian_ids]
        keys, values = self.gk(win) / math.sqrt(cfg.gauss_dim), self.gv(win)  # [T, W, g] each
        # without gradients, blocks of Gaussians: each block's [T, W, n] and [T, n, g]
        # intermediates stay in the CPU's cache (2.5x faster than all 50,000 at once; the same
        # numbers)
        block = max(len(gq), 1) if torch.is_grad_enabled() else GAUSS_BLOCK
        heads = [self.gaussian_head(keys, values, gq[i : i + block], lips, gb[i : i + block])
                 for i in range(0, max(len(gq), 1), block)]  # fmt: skip
        offsets, log_scales, opacity, color = (
            x[0] if len(x) == 1 else torch.cat(x, 1) for x in zip(*heads, strict=True)
        )
        motion = Motion(
            controls=controls,
            particles=particles,
            offsets=offsets,
            log_scales=log_scales,
            opacity=opacity,
            color=color,
            gate=gamma,
            visemes=visemes,
            lips=lips,
        )
        new_state = DeformerState(
            transforms,
            hidden,
            window[-(cfg.window - 1) :],
            start + num_frames,
            bones[-1],
            (ref, last),
        )
        return motion, new_state


# ---- checkpoints ---------------------------------------------------------------------------------
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "speech_deformer.safetensors"


def write_checkpoint(state: dict[str, Tensor], path: str | Path, config: str,
                     meta: dict | None = None) -> None:  # fmt: skip
    """A safetensors checkpoint, atomically: the tensors, the model's config (JSON) and `meta`
    (each value JSON), the format of every motion model the project ships."""
    from safetensors.torch import save_file

    from render.io import atomic_path

    meta = {"config": config, **{k: json.dumps(v) for k, v in (meta or {}).items()}}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """The tensors of a `write_checkpoint` file and its config (a dict)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, json.loads(meta.get("config", "{}"))


def save_deformer(model: SpeechDeformer, path: str | Path, meta: dict | None = None) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("audio.model.")}
    write_checkpoint(state, path, model.cfg.to_json(), meta)


def deformer_meta(path: str | Path) -> dict:
    """What `write_checkpoint` stored with a checkpoint besides its config (e.g. "training")."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "config"}


def load_deformer(
    path: str | Path | None = None, audio_encoder: str | None = None
) -> SpeechDeformer:
    """A deformer from a safetensors checkpoint (the shipped default when `path` is None).

    A checkpoint trained on wav2vec 2.0 features (`python -m distill.train_drive --audio-encoder
    DIR`) holds its adapter, not the wav2vec weights: those load from `audio_encoder`, or from
    the directory it was trained with. A log-mel checkpoint cannot take a wav2vec encoder (its
    adapter would be untrained and the motion noise)."""
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{path}: no deformer checkpoint there")
    state, config = read_checkpoint(path)
    cfg = DeformerConfig(**config)
    if audio_encoder and not cfg.audio_encoder:
        raise ValueError(
            f"{path} was trained on log-mel features, so it has no wav2vec 2.0 adapter. Train "
            f"one: python -m distill.train_drive --audio-encoder {audio_encoder} --out CKPT, "
            "then pass that checkpoint (--deformer CKPT)"
        )
    if audio_encoder:  # the same model, wherever it lives now
        cfg = DeformerConfig(**{**asdict(cfg), "audio_encoder": str(audio_encoder)})
    elif cfg.audio_encoder and not Path(cfg.audio_encoder).is_dir():
        raise ValueError(f"{path} was trained on wav2vec 2.0 from {cfg.audio_encoder}, which is "
                         "not there; pass the model's directory (--audio-encoder DIR)")  # fmt: skip
    model = SpeechDeformer(cfg)
    load_exact(model, state, str(path))
    return model.eval()


def load_exact(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load `state` into `model` only if it fits exactly: the same keys (a frozen wav2vec 2.0
    model's `audio.model.*` weights are never stored), shapes and dtypes; else a ValueError
    naming `where` and the first difference. Never a partial load."""
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("audio.model.")}
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        first = f"'{missing[0]}' is missing" if missing else f"'{unexpected[0]}' is unexpected"
        raise ValueError(f"{where}: weights do not match the deformer ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected: {first})")  # fmt: skip
    for k, v in state.items():
        if v.shape != want[k].shape or v.dtype != want[k].dtype:
            raise ValueError(f"{where}: weight '{k}' is {str(v.dtype)[6:]} {list(v.shape)}, the "
                             f"deformer's is {str(want[k].dtype)[6:]} {list(want[k].shape)}")  # fmt: skip
    model.load_state_dict(state, strict=False)  # exactly `want`'s keys, checked above
