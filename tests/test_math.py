"""The math of ddpm.py against independent calculations, beyond the learner's checks in test_ddpm.py:
schedules, samplers, network, EMA. CPU, seconds."""

import numpy as np
import pytest
import torch

import ddpm
import checks
from helpers import small_cfg


def test_linear_schedule_matches_the_paper():
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    assert sched.beta[0].item() == pytest.approx(1e-4) and sched.beta[-1].item() == pytest.approx(0.02)
    assert (sched.alpha_bar[1:] < sched.alpha_bar[:-1]).all()  # strictly decreasing
    # Independent: the product in numpy, in float64.
    expected = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
    assert expected == pytest.approx(4.04e-5, rel=2e-3)
    assert sched.alpha_bar[-1].item() == pytest.approx(expected, rel=1e-4)


def test_cosine_schedule_follows_its_alpha_bar():
    T, s = 1000, 0.008
    sched = ddpm.Schedule(ddpm.cosine_beta(T))
    t = np.arange(1, T + 1)
    f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2
    # alpha_bar_t = f(t) / f(0), except where the 0.999 clip on beta bites (the very last steps)
    np.testing.assert_allclose(sched.alpha_bar[:990].numpy(), (f(t) / f(0))[:990], rtol=1e-4)
    assert (sched.beta <= 0.999).all() and (sched.alpha_bar[1:] < sched.alpha_bar[:-1]).all()


class FixedEps(torch.nn.Module):
    """A stand-in for eps_theta: a fixed, smooth function of x and t."""

    def forward(self, x, t):
        return 0.3 * torch.tanh(x) + 0.001 * t.float().view(-1, 1, 1, 1)


def test_p_sample_is_algorithm_2_line_4():
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    x0 = 0.5 * torch.rand(4, 3, 4, 4) - 0.25
    model = FixedEps()
    for i in (1, 10, 500, 999):
        t = torch.full((4,), i)
        eps = model(torch.zeros(4, 3, 4, 4), t)  # eps_pred at x = 0, ...
        xt = ddpm.q_sample(sched, x0, t, eps)
        model_at = lambda x, tt: eps  # ... served at x_t, so x0_pred = x0 lies inside [-1, 1]
        got = ddpm.p_sample(model_at, sched, xt, i, torch.Generator().manual_seed(7))
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7))
        b = 1e-4 + (0.02 - 1e-4) * i / 999
        ab = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:i + 1]))
        expected = (xt - b / np.sqrt(1 - ab) * eps) / np.sqrt(1 - b) + np.sqrt(b) * z
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_the_last_ddim_step_is_the_clipped_x0_without_noise():
    # The no-noise check of Algorithm 2 itself is in test_ddpm.py; DDIM's last step lands on x_0 the same way.
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    x, _ = ddpm.ddim_sample(FixedEps(), sched, (2, 3, 4, 4), steps=10, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0 + 1e-6  # the last DDIM step returns the clipped x_0 prediction, noise-free


def test_ddim_with_eta_1_and_all_steps_is_ddpm_with_posterior_variance():
    sched = ddpm.Schedule(ddpm.linear_beta(100, 1e-3, 0.1))  # T = 100 keeps the loop fast
    ddim, traj = ddpm.ddim_sample(FixedEps(), sched, (3, 3, 4, 4), steps=100, eta=1.0,
                                  generator=torch.Generator().manual_seed(3), keep=(50,))
    # The same chain by hand, with DDPM steps of variance beta_tilde, drawing noise in the same order.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((3, 3, 4, 4), generator=gen)
    for t in reversed(range(100)):
        x = ddpm.p_sample(FixedEps(), sched, x, t, gen, var="beta_tilde")
        if t == 50:
            torch.testing.assert_close(traj[50], x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddim, x, rtol=1e-4, atol=1e-4)


def test_ddim_with_eta_0_is_deterministic_given_x_T():
    sched = ddpm.Schedule(ddpm.linear_beta(100, 1e-3, 0.1))
    a, _ = ddpm.ddim_sample(FixedEps(), sched, (2, 3, 4, 4), steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    b, _ = ddpm.ddim_sample(FixedEps(), sched, (2, 3, 4, 4), steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_a_size_the_unet_cannot_halve_is_refused():
    with pytest.raises(checks.UserError, match="divisible by 2 \\*\\* 2 = 4"):
        checks.check_config(small_cfg(image_size=18, ch_mult=(1, 2, 2)))
    with pytest.raises(AssertionError):  # and the U-Net itself, built from Python without the check
        ddpm.UNet(small_cfg(image_size=18, ch_mult=(1, 2, 2)))


def test_paper32_has_the_papers_parameter_count():
    n = sum(p.numel() for p in ddpm.UNet(ddpm.make_config("paper32")).parameters())
    assert abs(n / 1e6 - 35.7) < 0.1  # appendix B: 35.7M parameters for the CIFAR-10 model


def test_time_embedding_is_the_transformer_sinusoid_and_tells_t_apart():
    t = torch.arange(1000)
    emb = ddpm.timestep_embedding(t, 64)
    assert emb.shape == (1000, 64)
    i = 5  # component i is sin(t / 10000^(i / 31)), component 32 + i its cosine
    np.testing.assert_allclose(emb[:, i].numpy(), np.sin(np.arange(1000) / 10000 ** (i / 31)), atol=1e-4)
    np.testing.assert_allclose(emb[:, 32 + i].numpy(), np.cos(np.arange(1000) / 10000 ** (i / 31)), atol=1e-4)
    dist = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert dist.min() > 0.1  # every step has its own embedding


def test_ema_update_is_the_moving_average():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ddpm.ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
