"""SDE-DPM-Solver++(2M) (solvers.py, sde=True) against calculations made without it: the exact moments of its
output with the perfect denoiser of Gaussian data (a float64 recursion, perfect_denoiser.exact_moments), DDIM
with eta = 1 when its second-order correction is off, and one step of diffusers' own scheduler (a fixture)."""

import json, math, os

import pytest
import torch

import ddpm
import solvers
from helpers import HERE
from perfect_denoiser import MixtureDenoiser, exact_moments

T, MU, S = 1000, 0.1, 0.3  # clipping x_0 at [-1, 1] acts on 0.3% of the values, at most, and only early


def sde_samples(steps, seed=0, shape=(2000, 1, 10, 10)):
    """2e5 values drawn by the solver with the perfect denoiser of N(MU, S^2), on the lambda grid."""
    sched, net = ddpm.Schedule(ddpm.linear_beta(T)), MixtureDenoiser(T, [MU], [S])
    g = torch.Generator().manual_seed(seed)
    return ddpm.draw(net, sched, shape, "sde-dpm++", steps, generator=g)


def gaps(x, mean, var):
    """How far the sample's mean and variance lie from the exact ones, in standard errors (Gaussian output)."""
    n, x = x.numel(), x.double()
    return abs(x.mean().item() - mean) / math.sqrt(var / n), abs(x.var().item() - var) / (var * math.sqrt(2 / n))


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_the_output_has_the_moments_of_the_exact_recursion(steps):
    mean, var = exact_moments("sde-dpm++", T, MU, S ** 2, steps, kind="lambda")
    assert max(gaps(sde_samples(steps), mean, var)) < 5


def test_noise_scaled_by_1_05_fails_the_same_check(monkeypatch):
    # Broken on purpose: every fresh noise of the solver 5% too large (not x_T, the first draw).
    real, drawn = torch.randn, []

    def randn(*args, **kwargs):
        drawn.append(1)
        return real(*args, **kwargs) * (1.0 if len(drawn) == 1 else 1.05)
    monkeypatch.setattr(solvers.torch, "randn", randn)
    worst = 0.0
    for steps in (5, 10, 20):
        drawn.clear()
        mean, var = exact_moments("sde-dpm++", T, MU, S ** 2, steps, kind="lambda")
        worst = max(worst, *gaps(sde_samples(steps), mean, var))
    assert worst > 5


def test_without_the_correction_it_is_ddim_with_eta_1():
    # sigma_next^2 (1 - e^{-2h}) is DDIM's sigma^2 at eta = 1 (beta_tilde of the two steps), and the mean is
    # the same posterior mean: first order, on the same grid, with the same noise, the two are one sampler.
    sched, net = ddpm.Schedule(ddpm.linear_beta(T)), MixtureDenoiser(T, [MU], [S])
    for steps, grid in [(7, "lambda"), (20, "uniform")]:
        ts = ddpm.timesteps(sched, steps, grid)
        a = solvers.dpm_solver_sample(net, sched.alpha_bar, ts, (4, 3, 8, 8), torch.Generator().manual_seed(2),
                                      sde=True, order=1)
        b, _ = ddpm.ddim_sample(net, sched, (4, 3, 8, 8), steps, 1.0, torch.Generator().manual_seed(2), grid=grid)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        c = solvers.dpm_solver_sample(net, sched.alpha_bar, ts, (4, 3, 8, 8), torch.Generator().manual_seed(2), sde=True)
        assert not torch.allclose(a, c, atol=1e-4)  # and the correction does change it


def test_one_second_order_step_matches_diffusers(monkeypatch):
    # tests/fixtures/sde_dpmpp_diffusers.json: made by tests/fixtures/sde_dpmpp_diffusers.py in a throwaway
    # virtual environment with diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"): two
    # steps from x_T with the perfect denoiser of N(0, 0.1^2) and the noises z1, z2; the second is second order.
    with open(os.path.join(HERE, "tests", "fixtures", "sde_dpmpp_diffusers.json")) as f:
        fx = json.load(f)
    x_T, z1, z2 = (torch.tensor(fx[k]) for k in ("x_T", "z1", "z2"))
    sched, perfect, seen = ddpm.Schedule(ddpm.linear_beta(1000)), MixtureDenoiser(1000, [0.0], [0.1]), []

    def net(x, t):  # the perfect denoiser, and a spy on the x it is called with
        seen.append(x.clone())
        return perfect(x, t)
    draws = iter([x_T, z1, z2])  # what the solver draws, in its order: x_T, then one noise per step
    monkeypatch.setattr(solvers.torch, "randn", lambda *a, **k: next(draws).clone())
    solvers.dpm_solver_sample(net, sched.alpha_bar, torch.tensor(fx["timesteps"]), tuple(x_T.shape), sde=True)
    ours, theirs = seen[2], torch.tensor(fx["x_after_two_steps"])  # x at the third time index: after two steps
    assert (ours - theirs).abs().max().item() <= fx["largest_difference"] * 2 + 1e-7
    assert (ours - theirs).abs().max().item() < 1e-4
