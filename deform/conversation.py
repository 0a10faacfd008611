"""The conversational motion model: the avatar's head, face and gaze while it talks and listens.

The speech deformer (`deform.deformer`) makes an avatar talk from its own voice. In a
conversation the avatar also listens; this model makes that motion from the two tracks' speech
probabilities (`deform.voice`) and the partner's audio, as UniLS, REALM and "Beyond Monologue"
describe (equations and settings in the README). Per video frame t, causal and streamed:

    e_role,t = m_t · e_speak + (1 − m_t) · e_listen          m_t: the own track's speech prob.
    h_t      = GRU(Proj_x(x_t−1) + e_role,t)                  the avatar's own motion history
    a_j      = Enc(partner log-mel)_j ⊕ p_j ⊕ x'_j−1 ⊕ 1     p_j: the partner's speech prob.,
                                                             x'_j−1 its motion (two avatars in
                                                             one scene; zeros ⊕ 0 when unknown)
    c_t      = Σ_j softmax_j(q_t·k_j/√d + b_h(t − j)) v_j     over j ∈ (t − W, t]
    b_h(d)   = −s_h · |d − τ| − (d − τ)² / (2 σ_h²)          shifted ALiBi (delay τ, slope s_h)
                                                             + a Gaussian temporal kernel (σ_h)
    g_t      = σ(W_g [h_t, c_t]),  u_t = g_t ⊙ c_t + (1 − g_t) ⊙ h_t
    coarse:  every K frames, the head pose K frames ahead: key = μ_c,k(u) + σ_c,k(u)·ε (the
             pose itself, not a change: sampling noise does not add up to a drift)
             with k drawn from a mixture of `mixtures` Gaussians (π_k(u)); frames in between
             ease from the last key to the new one (the head's slow trajectory)
    fine:    expression and gaze  f_t = μ_f(u_t) + σ_f(a_t, e_role) · ε_t   (audio-modulated
             noise; ε an AR(1) process with unit variance, ρ = 0.95 per frame)
    nods:    a listener's nods are events: a nod starts at frame t with probability
             h_t = σ(w · u_t) (the hazard), its amplitude ~ N(μ_a(u_t), σ_a(u_t)), and moves the
             head and neck by the fixed curve `nod_curve` on top of the coarse trajectory

x_t are the motion features of `FEATURES` (normalised by the training data's mean and spread).
Stage 1 (audio-free) trains with c_t = 0 and the gate shut (u_t = h_t); stage 2 opens both.
Heads: σ_h = `kernel_frames` (narrow heads for talking, wide for listening), slopes 2^−(h+1)
per frame, τ = `delay_s` (REALM: about 0.26 s). Look-ahead: the partner's log-mel encoder's
92.5 ms; the speech probabilities' 32 ms window. Randomness is drawn from a generator seeded
once per clip, one draw per frame in order, so any chunking gives the same motion.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .audio_features import LogMelEncoder
from .controls import DRIVEN_BONES, TEMPLATE_ACTIONS

# what the model moves: head, neck and chest rotations (coarse), then the large facial actions
# and the eyes' gaze (fine) as yaw and pitch away from the partner, radians
COARSE_BONES = ("head", "neck02", "spine02")
FINE = (*TEMPLATE_ACTIONS, "gazeYaw", "gazePitch")
FEATURES = tuple(f"{b}.{a}" for b in COARSE_BONES for a in "xyz") + FINE
NUM_COARSE = 3 * len(COARSE_BONES)
NOD_RISE_S, NOD_FALL_S = 0.18, 0.3  # a nod's way down and back up
# sampling: the learned spreads at full size overshoot the teacher's motion (Fréchet distance 160
# against 31 at 0.4 on validation conversations, README); ε of the fine features is AR(1)
TEMPERATURE, DETAIL_RHO = 0.5, 0.95
NOD_WEIGHTS = {"head.x": 1.0, "neck02.x": 0.5}  # +x tips forward: a nod goes down first


def ease_bump(dt, rise: float, fall: float):
    """0 → 1 → 0 at `dt` seconds after an onset: a smooth rise over `rise` s, then a smooth fall
    over `fall` s (numpy or torch, any shape)."""
    lib = torch if isinstance(dt, Tensor) else np
    up = lib.clip(dt / rise, 0, 1)
    down = lib.clip((dt - rise) / fall, 0, 1)
    ease = lambda s: s * s * (3 - 2 * s)  # noqa: E731
    return ease(up) * (1 - ease(down))


def nod_curve(dt):
    """A nod's shape at `dt` seconds after its onset."""
    return ease_bump(dt, NOD_RISE_S, NOD_FALL_S)


def nod_vector() -> Tensor:
    """[F] what a nod of amplitude 1 adds to each feature."""
    v = torch.zeros(len(FEATURES))
    for name, w in NOD_WEIGHTS.items():
        v[FEATURES.index(name)] = w
    return v


assert COARSE_BONES == DRIVEN_BONES[: len(COARSE_BONES)]


@dataclass(frozen=True)
class ConverseConfig:
    dim: int = 64
    heads: int = 4
    audio_dim: int = 32  # partner log-mel tokens
    window: int = 64  # partner frames attended (2.56 s at 25 fps)
    coarse: int = 5  # frames per coarse head key (0.2 s at 25 fps)
    mixtures: int = 4  # Gaussians in the coarse head's mixture
    delay_s: float = 0.26  # τ of the shifted ALiBi bias
    kernel_frames: tuple[float, ...] = (2.0, 4.0, 12.0, 32.0)  # σ_h per head
    fps: float = 25.0  # the rate the model was trained at (τ and σ_h are in its frames)
    history: bool = True  # False: no motion history (the audio-only ablation)
    partner_audio: bool = True  # False: audio-free (stage 1; the stage-1-only ablation)
    partner_motion: bool = True  # the partner's motion in the attended tokens (two streams)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def temporal_bias(cfg: ConverseConfig) -> Tensor:
    """[heads, W] b_h(d) for d = W−1 .. 0 (oldest partner frame first)."""
    d = torch.arange(cfg.window - 1, -1, -1, dtype=torch.float32)
    tau = cfg.delay_s * cfg.fps
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(cfg.heads)])[:, None]
    sigma = torch.tensor(cfg.kernel_frames, dtype=torch.float32)[:, None]
    return -slopes * (d - tau).abs() - (d - tau) ** 2 / (2 * sigma**2)


@dataclass
class ConverseState:
    """What carries from one streamed chunk to the next."""

    hidden: Tensor  # [1, 1, d] GRU state
    last: Tensor  # [F] normalised motion features of the previous frame
    smooth: Tensor  # [NUM_COARSE] the same frame's head without its nods (normalised)
    nods: list[tuple[int, float]]  # (onset frame, amplitude) of the nods still moving
    partner: Tensor  # [W-1, token_width] the partner tokens before this frame
    keys: tuple[Tensor, Tensor]  # the head's last and next coarse keys (normalised)
    noise: Tensor  # [len(FINE)] the AR(1) noise of the fine features
    frame: int
    rng: torch.Generator = field(repr=False)
    shown: Tensor | None = None  # in a pair: what the partner saw of the last frame (normalised)


class ConverseModel(nn.Module):
    def __init__(self, cfg: ConverseConfig = ConverseConfig()):
        super().__init__()
        self.cfg = cfg
        d, f, a = cfg.dim, len(FEATURES), cfg.audio_dim + 1
        self.audio_width = a  # a token: the partner's audio and speech probability, then
        self.token_width = a + (f + 1 if cfg.partner_motion else 0)  # motion and "present"
        if len(cfg.kernel_frames) != cfg.heads:
            raise ValueError("one Gaussian kernel width per attention head")
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.role = nn.Parameter(torch.randn(2, d) * 0.1)  # e_speak, e_listen
        self.proj_x = nn.Linear(f, d)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.audio = LogMelEncoder(cfg.audio_dim, hidden=64)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(self.token_width, 2 * d)
        self.out = nn.Linear(d, d)
        self.register_buffer("bias", temporal_bias(cfg), persistent=False)
        self.gate = nn.Linear(2 * d, d)
        c = cfg.mixtures
        self.coarse_head = nn.Sequential(nn.Linear(d, d), nn.GELU(),
                                         nn.Linear(d, c * (1 + 2 * NUM_COARSE)))  # fmt: skip
        self.fine_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, len(FINE)))
        self.noise_head = nn.Sequential(nn.Linear(a + d, d), nn.GELU(), nn.Linear(d, len(FINE)))
        self.nod_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 3))
        nn.init.constant_(self.nod_head[-1].bias, -4.0)  # nods are rare: start near none
        self.register_buffer("nod", nod_vector(), persistent=False)
        self.audio_on = cfg.partner_audio  # False: stage 1, c_t = 0 and the gate shut

    # ---- pieces -------------------------------------------------------------------------------
    def roles(self, own: Tensor) -> Tensor:  # [..., T] -> [..., T, d]
        return own[..., None] * self.role[0] + (1 - own[..., None]) * self.role[1]

    def partner_tokens(self, samples: Tensor | np.ndarray, partner_prob: Tensor, start: int,
                       stop: int, motion: Tensor | None = None) -> Tensor:  # fmt: skip
        """[stop − start, token_width] a_j for partner frames start..stop−1 (`partner_prob`
        covers them): the partner's audio and speech probability, then (with
        `cfg.partner_motion`) its normalised motion features of frame j − 1 and 1, or zeros
        and 0 where its motion is not known (`motion` None: one avatar in the scene)."""
        return self.with_motion(self.audio_tokens(samples, partner_prob, start, stop), motion)

    def audio_tokens(self, samples: Tensor | np.ndarray, partner_prob: Tensor, start: int,
                     stop: int) -> Tensor:  # fmt: skip
        """[stop − start, a+1] the audio part of `partner_tokens`."""
        enc = self.audio.encode(samples, start, stop, self.cfg.fps)
        return torch.cat([enc, partner_prob[:, None].to(enc)], -1)

    def with_motion(self, audio: Tensor, motion: Tensor | None) -> Tensor:
        """Audio tokens [..., T, a+1] completed with the partner's normalised motion [..., T, F]
        and a 1 (None: zeros and a 0)."""
        if not self.cfg.partner_motion:
            return audio
        if motion is None:
            return torch.cat([audio, audio.new_zeros(*audio.shape[:-1], len(FEATURES) + 1)], -1)
        return torch.cat([audio, motion.to(audio), audio.new_ones(*audio.shape[:-1], 1)], -1)

    def attend(self, h: Tensor, tokens: Tensor) -> Tensor:
        """c_t [B, T, d] from h [B, T, d] and partner tokens [B, W−1+T, a+1] (window first)."""
        cfg, (_, t, d) = self.cfg, h.shape
        k, v = self.kv(tokens).chunk(2, -1)  # [B, W-1+T, d]
        win = lambda x: x.unfold(1, cfg.window, 1)[:, :t]  # [B, T, d, W]  # noqa: E731
        dh = d // cfg.heads
        q = self.q(h).unflatten(-1, (cfg.heads, dh))  # [B, T, H, dh]
        kw = win(k).unflatten(2, (cfg.heads, dh))  # [B, T, H, dh, W]
        vw = win(v).unflatten(2, (cfg.heads, dh))
        logits = (q[..., None] * kw).sum(-2) / math.sqrt(dh) + self.bias  # [B, T, H, W]
        att = torch.softmax(logits, -1)
        return self.out((att[..., None, :] * vw).sum(-1).flatten(-2))

    def mix(self, h: Tensor, c: Tensor) -> Tensor:
        if not self.cfg.history:
            return c
        if not self.audio_on:
            return h
        g = torch.sigmoid(self.gate(torch.cat([h, c], -1)))
        return g * c + (1 - g) * h

    def heads_out(self, u: Tensor, tokens: Tensor, roles: Tensor):
        """Mixture logits [..., C], means and log-spreads [..., C, 9] of the coarse head, the fine
        features' means and spreads [..., len(FINE)]."""
        c = self.cfg.mixtures
        raw = self.coarse_head(u)
        logit_c = raw[..., :c]
        mu_c, log_sc = raw[..., c:].unflatten(-1, (c, 2 * NUM_COARSE)).chunk(2, -1)
        mu_f = self.fine_head(u)
        a = tokens[..., : self.audio_width]
        a = a if self.audio_on else torch.zeros_like(a)
        sigma_f = nn.functional.softplus(self.noise_head(torch.cat([a, roles], -1))) + 1e-3
        return (logit_c, mu_c, log_sc.clamp(-6, 2)), mu_f, sigma_f

    # ---- training: teacher-forced, all frames at once -------------------------------------------
    def forward(self, x: Tensor, own: Tensor, tokens: Tensor,
                history_noise: float = 0.0) -> dict[str, Tensor]:  # fmt: skip
        """x [B, T, F] normalised features, own [B, T], tokens [B, W−1+T, a+1]; the outputs
        for every frame t given x up to t−1 (plus `history_noise` · N(0, 1) in training, so the
        model learns to recover from its own errors when it runs on its own output)."""
        roles = self.roles(own)
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        prev = prev + history_noise * torch.randn_like(prev)
        if not self.cfg.history:
            prev = torch.zeros_like(prev)
        h, _ = self.gru(self.proj_x(prev) + roles)
        c = self.attend(h, tokens) if self.audio_on else torch.zeros_like(h)
        u = self.mix(h, c) + (0 if self.cfg.history else roles)
        t = x.shape[1]
        coarse, mu_f, sigma_f = self.heads_out(u, tokens[:, -t:], roles)
        return {"coarse": coarse, "mu_f": mu_f, "sigma_f": sigma_f, "nod": self.nod_head(u)}

    def loss(self, x: Tensor, own: Tensor, tokens: Tensor, smooth: Tensor, onsets: Tensor,
             amplitude: Tensor, history_noise: float = 0.0) -> dict[str, Tensor]:  # fmt: skip
        """x [B, T, F] and its head without nods `smooth` [B, T, NUM_COARSE] (normalised),
        `onsets` [B, T] 1 where a nod starts, `amplitude` [B, T] its amplitude (radians).
        Negative log-likelihoods: the nod-free head key K frames ahead (predicted every K
        frames), each frame's fine features, whether a nod starts (Bernoulli) and its
        amplitude (Gaussian)."""
        out, k = self.forward(x, own, tokens, history_noise), self.cfg.coarse
        t = x.shape[1]
        at = torch.arange(1, t - k, k)  # key frames (prev exists), target K−1 frames later
        target = smooth[:, at + k - 1]
        logit, mu, log_s = (v[:, at] for v in out["coarse"])
        per = -(0.5 * ((target[..., None, :] - mu) / log_s.exp()) ** 2 + log_s).sum(-1)
        mix = torch.logsumexp(torch.log_softmax(logit, -1) + per, -1)  # log p, less constants
        coarse = -mix.mean() / NUM_COARSE
        z = (x[..., NUM_COARSE:] - out["mu_f"]) / out["sigma_f"]
        fine = (0.5 * z**2 + out["sigma_f"].log()).mean()
        hazard, mu_a, log_sa = out["nod"].unbind(-1)
        starts = nn.functional.binary_cross_entropy_with_logits(hazard, onsets)
        za = (amplitude - mu_a) / log_sa.clamp(-6, 2).exp()
        amp = ((0.5 * za**2 + log_sa.clamp(-6, 2)) * onsets).sum() / onsets.sum().clamp_min(1)
        return {"coarse": coarse, "fine": fine, "nods": 100 * starts, "amplitude": 0.1 * amp}

    # ---- inference: streamed -----------------------------------------------------------------
    def start(self, seed: int = 0) -> ConverseState:
        d, a = self.cfg.dim, self.token_width
        rng = torch.Generator().manual_seed(int(seed))
        rest = (torch.zeros(len(FEATURES)) - self.mean) / self.std  # the base pose, no action
        head = rest[:NUM_COARSE]
        return ConverseState(torch.zeros(1, 1, d), rest, head, [],
                             torch.zeros(self.cfg.window - 1, a), (head, head),
                             torch.zeros(len(FINE)), 0, rng)  # fmt: skip

    @torch.no_grad()
    def step(self, state: ConverseState, own: Tensor, partner: Tensor | np.ndarray,
             partner_prob: Tensor, temperature: float = TEMPERATURE) -> tuple[Tensor, ConverseState]:  # fmt: skip
        """The next T frames: `own` [T] and `partner_prob` [T] are the tracks' speech
        probabilities of those frames, `partner` the partner's 16 kHz samples (the whole track).
        Returns motion features [T, F] (not normalised: radians and action weights).
        `temperature` scales the sampled spreads (1: the learned ones). The partner's motion
        is not known (one avatar): its tokens' motion part is zeros and 0."""
        state = replace(state, nods=list(state.nods))
        tokens = self.partner_tokens(partner, partner_prob, state.frame, state.frame + len(own))
        roles = self.roles(own.float())
        rows = [self._frame(state, roles[i], tokens[i], temperature) for i in range(len(own))]
        return torch.stack(rows) * self.std + self.mean, state

    @torch.no_grad()
    def step_pair(self, states: list[ConverseState], owns: list[Tensor],
                  voices: list[Tensor | np.ndarray], temperature: float = TEMPERATURE,
                  shown: list[tuple[Tensor, Tensor]] | None = None,
                  ) -> tuple[list[Tensor], list[ConverseState]]:  # fmt: skip
        """Two avatars in one conversation, the next T frames of both, stepped together: each
        attends to the other's voice and to the other's motion up to the frame before (the
        streams' cross-attention). `owns[k]` [T] is avatar k's speech probability (the other's
        partner probability), `voices[k]` its 16 kHz track. `shown[k]` = (w [T, F], y [T, F]):
        what avatar k shows is w ⊙ y + (1 − w) ⊙ its own features (raw units), where another
        source moves it (the speech deformer while it talks); None: its features alone.
        Returns both [T, F] (as `step`)."""
        states = [replace(s, nods=list(s.nods)) for s in states]
        num, start = len(owns[0]), states[0].frame
        audio = [self.audio_tokens(voices[1 - k], owns[1 - k], start, start + num)
                 for k in range(2)]  # fmt: skip
        roles = [self.roles(o.float()) for o in owns]
        rows: list[list[Tensor]] = [[], []]
        seen = [s.last if s.shown is None else s.shown for s in states]  # the frame before
        for i in range(num):
            for k in range(2):
                token = self.with_motion(audio[k][i], seen[1 - k])
                rows[k].append(self._frame(states[k], roles[k][i], token, temperature))
            seen = [rows[0][-1], rows[1][-1]]
            for k, (w, y) in enumerate(shown or []):
                x = seen[k] * self.std + self.mean
                seen[k] = (w[i] * y[i] + (1 - w[i]) * x - self.mean) / self.std
        for k in range(2):
            states[k].shown = seen[k]
        return [torch.stack(r) * self.std + self.mean for r in rows], states

    def _frame(
        self, state: ConverseState, role: Tensor, token: Tensor, temperature: float
    ) -> Tensor:
        """Advance `state` (in place) by one frame given its role embedding and the partner's
        token; returns the frame's normalised features."""
        cfg, frame = self.cfg, state.frame
        window = torch.cat([state.partner, token[None]], 0)  # [W, token]
        prev = state.last if cfg.history else torch.zeros_like(state.last)
        h, state.hidden = self.gru((self.proj_x(prev) + role)[None, None], state.hidden)
        c = self.attend(h, window[None]) if self.audio_on else 0 * h
        u = self.mix(h, c)[0, 0] + (0 if cfg.history else role)
        (logit, mu_c, log_sc), mu_f, sigma_f = self.heads_out(u, token, role)
        hazard, mu_a, log_sa = self.nod_head(u).unbind(-1)
        eps = torch.randn(NUM_COARSE + len(FINE) + 1, generator=state.rng)
        pick, start_nod = torch.rand(2, generator=state.rng)
        key0, key1 = state.keys
        if frame % cfg.coarse == 0:  # a new key for the end of this segment
            key0 = state.smooth
            cum = torch.softmax(logit, -1).cumsum(-1)
            k = min(int((cum < pick).sum()), cfg.mixtures - 1)
            key1 = mu_c[k] + temperature * log_sc[k].exp() * eps[:NUM_COARSE]
        if start_nod < torch.sigmoid(hazard):
            amp = mu_a + temperature * log_sa.clamp(-6, 2).exp() * eps[-1]
            state.nods.append((frame, float(amp.clamp(0.0, 0.25))))
        s = (frame % cfg.coarse + 1) / cfg.coarse
        state.smooth = key0 + (key1 - key0) * s * s * (3 - 2 * s)
        state.nods = [
            (f, a) for f, a in state.nods if (frame - f) / cfg.fps < NOD_RISE_S + NOD_FALL_S
        ]
        lift = sum(a * float(nod_curve((frame - f) / cfg.fps)) for f, a in state.nods)
        rho = DETAIL_RHO
        state.noise = rho * state.noise + math.sqrt(1 - rho**2) * eps[NUM_COARSE:-1]
        nod = (self.nod / self.std)[:NUM_COARSE]  # a nod of 1 rad, normalised
        state.last = torch.cat(
            [state.smooth + lift * nod, mu_f + temperature * sigma_f * state.noise]
        )
        state.keys, state.partner, state.frame = (key0, key1), window[1:], frame + 1
        return state.last


# ---- checkpoints ---------------------------------------------------------------------------------
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "converse.safetensors"


def save_converse(model: ConverseModel, path: str | Path, meta: dict | None = None) -> None:
    from .deformer import write_checkpoint

    cfg = replace(model.cfg, partner_audio=model.audio_on)
    write_checkpoint(model.state_dict(), path, cfg.to_json(), meta)


def converse_meta(path: str | Path | None = None) -> dict:
    """What `save_converse` stored with a checkpoint besides its config (e.g. "training")."""
    from .deformer import deformer_meta

    return deformer_meta(path or DEFAULT_CHECKPOINT)


def load_converse(path: str | Path | None = None) -> ConverseModel:
    """The conversational model from a safetensors checkpoint (the shipped one when None)."""
    from .deformer import load_exact, read_checkpoint

    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{path}: no conversation-model checkpoint there (train one: python -m "
                         "distill.train_converse --out PATH)")  # fmt: skip
    state, raw = read_checkpoint(path)
    raw["kernel_frames"] = tuple(raw.get("kernel_frames", ConverseConfig.kernel_frames))
    raw.setdefault("partner_motion", False)  # checkpoints from before the two-stream tokens
    model = ConverseModel(ConverseConfig(**raw))
    load_exact(model, state, str(path))
    return model.eval()
