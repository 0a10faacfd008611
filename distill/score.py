"""Score distillation (the paper's video score distillation, eq. 9), framework-agnostic.

A teacher noises clean latents z (the encoded renders) as x = α(τ)·z + σ(τ)·ε and predicts; the
prediction becomes an ε estimate ε̂ and the gradient w(τ)·(ε̂ − ε) is pushed onto z with the
`target = (z − grad).detach()` trick, so autograd carries it through whatever produced z.

ε̂ from each prediction type (x = α·z + σ·ε; all four give the same ε̂ for the same model):

- "epsilon": ε̂ = out.
- "v_prediction" (v = α·ε − σ·z): α·v + σ·x = (α² + σ²)·ε, so ε̂ = (α·v + σ·x) / (α² + σ²).
- "sample" (out = ẑ): ε̂ = (x − α·ẑ) / σ.
- "flow" (velocity v = ε − z): x = α·(ε − v) + σ·ε, so ε̂ = (x + α·v) / (α + σ); with rectified
  flow (α = 1 − τ, σ = τ) this is ε̂ = x + (1 − τ)·v.

Equivalent residuals: ε̂ − ε = −(α/σ)·(ẑ − z) for every schedule, and for a flow teacher
ε̂ − ε = α·(v̂ − v) with v = ε − z the sample's true velocity; so the ε form is the flow-SDS
velocity residual (and the x0 residual) up to a weight that `weighting` absorbs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
Predict = Callable[[Tensor, Tensor, Any], Tensor]  # (x [B, ...], tau [B], cond) -> output [B, ...]
# "sds", "uniform" or a callable (alpha [B], sigma [B]) -> w [B]
Weighting = Literal["sds", "uniform"] | Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """How a teacher noises clean latents z: x = α(τ)·z + σ(τ)·ε, with τ in the teacher's units.

    - "vp": DDPM-style; τ an integer timestep into `alphas_cumprod`; α = sqrt(ᾱ_τ), σ = sqrt(1 − ᾱ_τ).
    - "edm": a σ-parametrised Euler scheduler (x_ve = z + s·ε; Stable Video Diffusion); τ = s and x
      is the model input after the scheduler's scaling x_ve / sqrt(1 + s²), a VP-equivalent
      α = 1 / sqrt(1 + s²), σ = s / sqrt(1 + s²).
    - "flow": rectified flow, τ ∈ [0, 1], x = (1 − τ)·z + τ·ε: α = 1 − τ, σ = τ.
    """

    kind: Literal["vp", "edm", "flow"]
    alphas_cumprod: Tensor | None = None  # [S], "vp" only
    sigma_min: float = 0.002  # "edm": range of s
    sigma_max: float = 700.0
    shift: float = 1.0  # "flow": the scheduler's static timestep shift

    def __post_init__(self) -> None:
        if self.kind not in ("vp", "edm", "flow"):
            raise ValueError(f"NoiseSchedule: unknown kind {self.kind!r} (vp, edm or flow)")
        if self.kind == "vp" and (self.alphas_cumprod is None or self.alphas_cumprod.ndim != 1):
            raise ValueError("NoiseSchedule('vp') needs a 1-D alphas_cumprod table")

    def tau_at(self, u: Tensor) -> Tensor:
        """Map fractions u [B] of the diffusion (0 clean, 1 pure noise) to τ [B].

        vp: the nearest timestep u·(S − 1); edm: s = tan(π·u/2) clamped to [sigma_min, sigma_max]
        (a cosine schedule, α = cos(π·u/2)); flow: τ = shift·u / (1 + (shift − 1)·u), as diffusers
        shifts its sigmas.
        """
        if self.kind == "vp":
            return (u * (len(self.alphas_cumprod) - 1)).round().long()
        if self.kind == "edm":
            return torch.tan(u * (math.pi / 2)).clamp(self.sigma_min, self.sigma_max)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def alpha(self, tau: Tensor) -> Tensor:  # [B] -> [B]
        if self.kind == "vp":
            return self.alphas_cumprod.to(tau.device)[tau].sqrt()
        if self.kind == "edm":
            return (1 + tau.float() ** 2).rsqrt()
        return 1 - tau.float()

    def sigma(self, tau: Tensor) -> Tensor:  # [B] -> [B]
        if self.kind == "vp":
            return (1 - self.alphas_cumprod.to(tau.device)[tau]).sqrt()
        if self.kind == "edm":
            return tau.float() * (1 + tau.float() ** 2).rsqrt()
        return tau.float()

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """The schedule of a diffusers scheduler.

        FlowMatch* schedulers (static `shift` only) -> "flow"; EulerDiscreteScheduler with
        continuous v-prediction timesteps (SVD) -> "edm"; any other with `alphas_cumprod` (DDPM,
        DDIM, Euler, ...) -> "vp". EDM* schedulers (σ_data preconditioning) are rejected.
        """
        config, name = scheduler.config, type(scheduler).__name__
        if name.startswith("FlowMatch"):
            if config.get("use_dynamic_shifting", False):
                raise ValueError(
                    f"{name}: dynamic (resolution-dependent) shifting is not supported; "
                    "build NoiseSchedule('flow', shift=...) with the shift you sample with"
                )
            return cls("flow", shift=float(config.get("shift", 1.0)))
        if name.startswith("EDM"):
            raise ValueError(f"{name}: EDM σ_data preconditioning is not supported")
        if config.get("timestep_type") == "continuous" and config.prediction_type == "v_prediction":
            sigmas = scheduler.sigmas[scheduler.sigmas > 0]
            lo, hi = config.get("sigma_min"), config.get("sigma_max")
            return cls(
                "edm",
                sigma_min=float(lo if lo is not None else sigmas.min()),
                sigma_max=float(hi if hi is not None else sigmas.max()),
            )
        table = getattr(scheduler, "alphas_cumprod", None)
        if table is None:
            raise ValueError(f"{name}: neither flow matching nor an alphas_cumprod table")
        return cls("vp", alphas_cumprod=torch.as_tensor(table).detach().float().cpu().clone())


def to_epsilon(
    output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: PredictionType
) -> Tensor:
    """The ε estimate from a model output (see the module docstring); alpha, sigma broadcast."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return (alpha * output + sigma * x) / (alpha**2 + sigma**2)
    if prediction_type == "sample":
        return (x - alpha * output) / sigma
    if prediction_type == "flow":
        return (x + alpha * output) / (alpha + sigma)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def score_distillation_loss(
    latents: Tensor,  # [B, ...] clean latents z, differentiable (e.g. [B, T, C, h, w] video)
    predict: Predict,
    schedule: NoiseSchedule,
    *,
    prediction_type: PredictionType = "epsilon",
    tau_range: tuple[float, float] = (0.02, 0.98),
    weighting: Weighting = "sds",
    guidance_scale: float | Tensor = 1.0,
    cond: Any = None,
    uncond: Any = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A scalar whose gradient is the score-distillation gradient, eq. 9.

    Per batch element: u ~ U(tau_range) (fractions, see `NoiseSchedule.tau_at`), τ = tau_at(u),
    ε ~ N(0, I), x = α(τ)·z + σ(τ)·ε; ε̂ from `predict(x, τ, cond)` under no_grad, with
    classifier-free guidance ε̂ = ε̂_u + g·(ε̂_c − ε̂_u) (`predict(x, τ, uncond)`) when
    guidance_scale g != 1 (a tensor g broadcasts against z, e.g. per frame); grad = w(τ)·(ε̂ − ε).

    ∂loss/∂latents = grad / B exactly (a batch mean). The chain-rule factor ∂x/∂z = α(τ) is NOT
    applied: as in DreamFusion it is folded into w, i.e. eq. 9's weight is w(τ)/α(τ).
    `weighting`: "sds" w = σ(τ)² (DreamFusion), "uniform" w = 1, or a callable (alpha, sigma) -> w.
    """
    lo, hi = tau_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"tau_range must satisfy 0 <= lo <= hi <= 1, got {tau_range}")
    b, device = latents.shape[0], latents.device
    draw = generator.device if generator is not None else device
    u = lo + (hi - lo) * torch.rand(b, generator=generator, device=draw)  # [B]
    noise = torch.randn(latents.shape, generator=generator, device=draw, dtype=latents.dtype)
    noise = noise.to(device)
    tau = schedule.tau_at(u.to(device))  # [B]
    view = (b,) + (1,) * (latents.ndim - 1)
    alpha = schedule.alpha(tau).to(latents.dtype).view(view)  # [B, 1, ...]
    sigma = schedule.sigma(tau).to(latents.dtype).view(view)
    with torch.no_grad():
        z = latents.detach()
        x = alpha * z + sigma * noise

        def eps_hat(c: Any) -> Tensor:
            return to_epsilon(predict(x, tau, c).to(x.dtype), x, alpha, sigma, prediction_type)

        eps = eps_hat(cond)
        if isinstance(guidance_scale, Tensor) or guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("guidance_scale != 1 needs `uncond`")
            eps_u = eps_hat(uncond)
            eps = eps_u + guidance_scale * (eps - eps_u)
        if weighting == "sds":
            w = sigma**2
        elif weighting == "uniform":
            w = torch.ones_like(sigma)
        elif callable(weighting):
            w = weighting(alpha.flatten(), sigma.flatten()).to(latents.dtype).view(view)
        else:
            raise ValueError(f"unknown weighting {weighting!r} (sds, uniform or a callable)")
        target = z - w * (eps - noise)
    return 0.5 * ((latents - target) ** 2).sum() / b
