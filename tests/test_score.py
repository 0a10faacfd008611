"""Score distillation against a toy teacher whose score is known in closed form.

Data z0 ~ N(m, s²·I) noised as x = α·z0 + σ·ε has x ~ N(α·m, (α²s² + σ²)·I), so the optimal
teacher predicts E[ε | x] = σ·(x − α·m) / V and E[z0 | x] = m + α·s²·(x − α·m) / V with
V = α²s² + σ². For latents θ the expected SDS gradient E_ε[w·(ε̂(α·θ + σ·ε) − ε)] is then
w·σ·α·(θ − m) / V, for every prediction type (all describe the same optimal ε̂).
"""

import pytest
import torch

from distill.score import NoiseSchedule, score_distillation_loss, to_epsilon

M = torch.tensor([0.5, -1.0, 2.0])
S = 0.6
THETA = torch.tensor([1.5, 0.0, 0.5])
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD's scaled_linear
SCHEDULES = {
    "vp": NoiseSchedule("vp", alphas_cumprod=torch.cumprod(1 - BETAS, 0)),
    "edm": NoiseSchedule("edm"),
    "flow": NoiseSchedule("flow", shift=3.0),
}


def toy_teacher(schedule: NoiseSchedule, prediction_type: str, calls: list | None = None):
    """The optimal predictor for data N(cond, S²·I) (cond defaults to M), as `prediction_type`."""

    def predict(x, tau, cond):  # x [B, D], tau [B]
        if calls is not None:
            calls.append(cond)
        m = M if cond is None else cond
        a, s = schedule.alpha(tau)[:, None], schedule.sigma(tau)[:, None]
        var = a**2 * S**2 + s**2
        eps = s * (x - a * m) / var
        z0 = m + a * S**2 * (x - a * m) / var
        outputs = {"epsilon": eps, "v_prediction": a * eps - s * z0, "sample": z0, "flow": eps - z0}
        return outputs[prediction_type]

    return predict


def mc_gradient(schedule, prediction_type, u=0.5, n=20000, seed=0, **kw) -> torch.Tensor:
    """The mean over n samples at the fixed fraction u of the gradient that reaches θ."""
    theta = THETA.clone().requires_grad_(True)
    latents = theta.expand(n, -1)  # [n, D]: θ.grad is the batch mean of the per-sample grads
    predict = toy_teacher(schedule, prediction_type)
    gen = torch.Generator().manual_seed(seed)
    loss = score_distillation_loss(
        latents, predict, schedule, prediction_type=prediction_type, tau_range=(u, u),
        generator=gen, **kw,
    )  # fmt: skip
    loss.backward()
    return theta.grad


def analytic(schedule, u=0.5, m=M, weight="sds"):
    """(expected gradient, its Monte-Carlo standard error per sample) at the fraction u."""
    tau = schedule.tau_at(torch.tensor([u]))
    a, s = schedule.alpha(tau)[0], schedule.sigma(tau)[0]
    w = s**2 if weight == "sds" else 1.0
    var = a**2 * S**2 + s**2
    return w * s * a * (THETA - m) / var, w * a**2 * S**2 / var


@pytest.mark.parametrize(
    "kind, prediction_type",
    [("vp", "epsilon"), ("vp", "v_prediction"), ("vp", "sample"), ("edm", "v_prediction"),
     ("flow", "flow"), ("flow", "epsilon")],
)  # fmt: skip
@pytest.mark.parametrize("u", [0.3, 0.7])
def test_expected_gradient_matches_closed_form(kind, prediction_type, u):
    n = 20000
    got = mc_gradient(SCHEDULES[kind], prediction_type, u=u, n=n)
    want, std = analytic(SCHEDULES[kind], u=u)
    assert torch.allclose(got, want, atol=5 * std / n**0.5), (got, want)


def test_uniform_weighting_drops_sigma_squared():
    n = 20000
    got = mc_gradient(SCHEDULES["vp"], "epsilon", n=n, weighting="uniform")
    want, std = analytic(SCHEDULES["vp"], weight="uniform")
    assert torch.allclose(got, want, atol=5 * std / n**0.5)


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
def test_all_parametrisations_give_the_same_gradient(kind):
    grads = [mc_gradient(SCHEDULES[kind], p, n=64) for p in ("epsilon", "v_prediction", "sample")]
    grads.append(mc_gradient(SCHEDULES[kind], "flow", n=64))
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-5)


def test_loss_gradient_is_the_sds_gradient_for_one_sample():
    schedule = SCHEDULES["vp"]
    weight = torch.nn.Linear(3, 3)
    seen = {}

    def predict(x, tau, cond):  # an arbitrary v-prediction model
        seen.update(x=x, tau=tau)
        return weight(x) * (1 + tau[:, None] / 1000)

    latents = torch.randn(1, 2, 3, requires_grad=True)  # [B, F, D]: any latent shape
    loss = score_distillation_loss(
        latents, predict, schedule, prediction_type="v_prediction", tau_range=(0.1, 0.9),
        weighting=lambda a, s: a * s, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    loss.backward()
    x, tau = seen["x"], seen["tau"]
    a, s = schedule.alpha(tau).view(1, 1, 1), schedule.sigma(tau).view(1, 1, 1)
    eps = (x - a * latents.detach()) / s
    with torch.no_grad():
        eps_hat = to_epsilon(predict(x, tau, None), x, a, s, "v_prediction")
    assert torch.allclose(latents.grad, a * s * (eps_hat - eps), atol=1e-5)
    assert 0.1 * 999 <= tau.item() <= 0.9 * 999


def test_optimising_latents_moves_them_to_the_data_mean():
    schedule = SCHEDULES["vp"]
    theta = torch.tensor([3.0, 2.0, -2.0], requires_grad=True)
    start = (theta - M).norm().item()
    optim = torch.optim.Adam([theta], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    predict = toy_teacher(schedule, "epsilon")
    for _ in range(300):
        optim.zero_grad()
        score_distillation_loss(theta.expand(16, -1), predict, schedule, generator=gen).backward()
        optim.step()
    assert (theta - M).norm().item() < 0.1 * start


def test_guidance_scale():
    schedule, n = SCHEDULES["vp"], 20000
    m_c, m_u = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, -0.5, 0.5])
    calls = []
    predict = toy_teacher(schedule, "epsilon", calls)

    def run(g, uncond=m_u):
        theta = THETA.clone().requires_grad_(True)
        score_distillation_loss(
            theta.expand(n, -1), predict, schedule, tau_range=(0.5, 0.5), guidance_scale=g,
            cond=m_c, uncond=uncond, generator=torch.Generator().manual_seed(1),
        ).backward()  # fmt: skip
        return theta.grad

    assert torch.allclose(run(1.0, uncond=None), run(1.0)) and all(c is m_c for c in calls)
    # guided optimum: m_u + g·(m_c − m_u), past the conditional mean; ε̂_c and ε̂_u share their
    # ε coefficient, so the per-sample spread is unguided's
    g = 3.0
    want, std = analytic(schedule, m=m_u + g * (m_c - m_u))
    got = run(g)
    assert torch.allclose(got, want, atol=5 * std / n**0.5)
    assert torch.equal(run(torch.full((3,), g)), got)  # per-element (e.g. per-frame) scales
    with pytest.raises(ValueError, match="uncond"):
        run(g, uncond=None)


def test_bad_arguments():
    predict = toy_teacher(SCHEDULES["vp"], "epsilon")
    with pytest.raises(ValueError, match="tau_range"):
        score_distillation_loss(THETA[None], predict, SCHEDULES["vp"], tau_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="weighting"):
        score_distillation_loss(THETA[None], predict, SCHEDULES["vp"], weighting="snr")
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule("ve")
