"""Check your understanding of the paper: the equations of ddpm.py against calculations made another way.

    python -m pytest test_ddpm.py        # about ten seconds on a laptop CPU

A companion to docs/walkthrough.md, in its order. Each test computes what the paper says in a way that does
not use the code it checks (numpy in float64, the one-step chain, Bayes' rule), so that a mistake in one
cannot hide behind the same mistake in the other. Break a line of ddpm.py on purpose and watch which test
fails. The rest of the project's tests are in tests/.
"""

import numpy as np
import pytest
import torch

import ddpm
import images

BETA = np.linspace(1e-4, 0.02, 1000)  # the paper's schedule (sec. 4), in numpy
ALPHA_BAR = np.cumprod(1 - BETA)  # ALPHA_BAR[i] is alpha_bar at paper step i + 1


def small_config(**changes):
    return ddpm.make_config("tiny", **{"image_size": 16, "ch": 8, "ch_mult": (1, 2), "attn_res": (8,), "T": 20, **changes})


def test_the_schedule_is_the_papers():
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    np.testing.assert_allclose(sched.beta.numpy(), BETA, rtol=1e-12)
    np.testing.assert_allclose(sched.alpha_bar.numpy(), ALPHA_BAR, rtol=1e-10)
    assert ALPHA_BAR[-1] == pytest.approx(4.04e-5, rel=2e-3)  # x_T keeps 0.6% of x_0: almost pure noise
    assert sched.alpha_bar_prev[0] == 1 and torch.equal(sched.alpha_bar_prev[1:], sched.alpha_bar[:-1])


def test_eq_4_is_the_one_step_process_chained():
    # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (eq. 2), applied t times: mean and variance of x_t
    # given x_0 follow a recursion, which eq. 4 must match in closed form.
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    x0 = torch.linspace(-1, 1, 7).view(7, 1, 1, 1)
    mean, var = x0.double().numpy().copy(), 0.0
    for i in range(1000):
        mean, var = np.sqrt(1 - BETA[i]) * mean, (1 - BETA[i]) * var + BETA[i]
        if i in (0, 9, 99, 499, 999):
            t = torch.full((7,), i)
            got_mean = ddpm.q_sample(sched, x0, t, torch.zeros_like(x0))  # eps = 0 gives the mean
            got_std = ddpm.q_sample(sched, x0, t, torch.ones_like(x0)) - got_mean  # eps = 1 adds one std
            np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(got_std.numpy(), np.sqrt(var) * np.ones_like(mean), rtol=1e-4)


def test_eq_7_is_bayes_rule():
    # q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0). As a function of x_{t-1} the
    # first is N(x_t / sqrt(alpha_t), beta_t / alpha_t) and the second N(sqrt(ab_prev) x_0, 1 - ab_prev): the
    # product of two Gaussians, whose precisions add and whose means are weighed by them.
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    gen = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(5, 3, 2, 2, generator=gen), torch.randn(5, 3, 2, 2, generator=gen)
    for i in (1, 2, 50, 500, 999):
        mean, var = ddpm.q_posterior(sched, x0, xt, torch.full((5,), i))
        ab_prev, b = ALPHA_BAR[i - 1], BETA[i]
        precision = 1 / (1 - ab_prev) + (1 - b) / b
        expected = (np.sqrt(ab_prev) * x0.double() / (1 - ab_prev) + np.sqrt(1 - b) * xt.double() / b) / precision
        np.testing.assert_allclose(var.flatten().numpy(), 1 / precision, rtol=1e-9)
        np.testing.assert_allclose(mean.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # At paper step 1 (index 0) nothing was noised before: the posterior is x_0 itself, with no variance.
    mean, var = ddpm.q_posterior(sched, x0, xt, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-6) and (var == 0).all()


class FixedEps(torch.nn.Module):
    """A stand-in for eps_theta: a fixed, smooth function of x and t, small enough that x_0 stays in [-1, 1]."""

    def forward(self, x, t):
        return 0.05 * torch.tanh(x) + 0.0001 * t.float().view(-1, 1, 1, 1)


def test_eq_11_is_eq_7_at_the_x0_of_eq_4():
    # Solve eq. 4 for x_0 at the network's eps, put it into the posterior mean of eq. 7: eq. 11 comes out. So
    # p_sample's clipped path (eq. 7 at the clipped x_0) and Algorithm 2 as printed (clip=False, eq. 11) agree
    # wherever the clip does not act; both against eq. 11 computed here in numpy.
    sched, gen = ddpm.Schedule(ddpm.linear_beta(1000)), torch.Generator().manual_seed(1)
    x0, eps = 0.5 * torch.rand(4, 3, 4, 4, generator=gen) - 0.25, torch.randn(4, 3, 4, 4, generator=gen)
    model = lambda x, t: eps  # a network whose eps is exact for this x_t: its x_0 is x0, inside [-1, 1]
    for i in (1, 10, 500, 999):
        xt = ddpm.q_sample(sched, x0, torch.full((4,), i), eps)
        e, x = eps.double().numpy(), xt.double().numpy()
        eq_11 = (x - BETA[i] / np.sqrt(1 - ALPHA_BAR[i]) * e) / np.sqrt(1 - BETA[i])
        for clip in (False, True):  # the step is mean + sqrt(beta_t) z: take away the z of the same seed
            step = ddpm.p_sample(model, sched, xt, i, torch.Generator().manual_seed(7), clip=clip)
            mean = step - torch.randn(xt.shape, generator=torch.Generator().manual_seed(7)) * np.sqrt(BETA[i])
            np.testing.assert_allclose(mean.double().numpy(), eq_11, rtol=1e-4, atol=2e-5)


def test_no_noise_at_the_last_step():
    # Algorithm 2, line 3: z = 0 at paper step t = 1 (index 0); at every other step z ~ N(0, I).
    sched, xt = ddpm.Schedule(ddpm.linear_beta(1000)), torch.randn(2, 3, 4, 4)
    last = [ddpm.p_sample(FixedEps(), sched, xt, 0, torch.Generator().manual_seed(s)) for s in (1, 2)]
    before = [ddpm.p_sample(FixedEps(), sched, xt, 1, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(last[0], last[1])  # the seed does not matter: no noise drawn
    assert not torch.allclose(before[0], before[1])


@pytest.mark.parametrize("size, ch_mult, attn", [(8, (1, 2), (4,)), (16, (1, 2, 2), (8,)), (24, (1, 2, 2, 2), (6, 3)),
                                                (32, (1,), ())])
def test_the_unet_keeps_the_shape(size, ch_mult, attn):
    model = ddpm.UNet(small_config(image_size=size, ch_mult=ch_mult, attn_res=attn))
    x = torch.randn(2, 3, size, size)
    assert model(x, torch.tensor([0, 19])).shape == x.shape  # eps_theta(x_t, t) is an image like x_t


def test_the_first_loss_is_one():
    # The U-Net's last conv starts at zero, so eps_pred = 0 and L_simple = mean(eps^2), which is about 1.
    torch.manual_seed(0)
    model, sched = ddpm.UNet(small_config()), ddpm.Schedule(ddpm.linear_beta(20))
    x0, g = torch.rand(32, 3, 16, 16) * 2 - 1, torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, sched.T, (32,), generator=g), torch.randn(x0.shape, generator=g)
    assert ddpm.loss_fn(model, sched, x0, t, eps).item() == pytest.approx(eps.pow(2).mean().item(), abs=1e-6)


def test_a_tiny_batch_can_be_overfit():
    # Algorithm 1 with t and eps drawn once and kept: the network can memorize four images' noise, and the
    # loss must fall to a tenth. If it does not, the gradient step is broken.
    torch.manual_seed(0)
    model, sched = ddpm.UNet(small_config(ch=16)), ddpm.Schedule(ddpm.linear_beta(20))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0 = ddpm.get_batch(images.toycars(4, 16), torch.arange(4), torch.zeros(4, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, sched.T, (4,), generator=g), torch.randn(x0.shape, generator=g)
    losses = []
    for _ in range(150):
        loss = ddpm.loss_fn(model, sched, x0, t, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 and losses[-1] < 0.1 * losses[0]


# Beyond the paper: the two training options of docs/recipe.md, each checked against its definition.

def test_min_snr_weights_each_image_by_min_snr_gamma_over_snr():
    # With eps_pred = 0 (the zero output conv), each image's squared error is mean(eps^2); Min-SNR-gamma
    # (Hang et al. 2023) weights it by min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t).
    model, sched = ddpm.UNet(small_config(T=1000)), ddpm.Schedule(ddpm.linear_beta(1000))
    x0, t = torch.zeros(3, 3, 16, 16), torch.tensor([0, 99, 999])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    snr = ALPHA_BAR[t.numpy()] / (1 - ALPHA_BAR[t.numpy()])
    errors = eps.pow(2).mean((1, 2, 3)).double().numpy()
    expected = np.mean(np.minimum(snr, 5) / snr * errors)
    assert ddpm.loss_fn(model, sched, x0, t, eps, min_snr=5).item() == pytest.approx(expected, rel=1e-5)
    assert snr[0] == pytest.approx(9999, rel=1e-6) and snr[2] < 5  # t = 1 weighted 5/9999; t = T by one
    assert (ALPHA_BAR / (1 - ALPHA_BAR) > 5).sum() == 130  # gamma = 5 moves only the lowest 13% of t


def test_input_perturbation_noises_x_t_with_eps_plus_gamma_eps_prime_and_keeps_the_target():
    # DDPM-IP (Ning et al. 2023): x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) (eps + gamma eps'), target eps.
    # A "network" that returns its input shows the x_t it was given.
    sched, gamma = ddpm.Schedule(ddpm.linear_beta(1000)), 0.1
    g = torch.Generator().manual_seed(0)
    x0, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([10, 500])
    eps, eps_prime = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    a = torch.from_numpy(ALPHA_BAR[t.numpy()]).float().view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * (eps + gamma * eps_prime)
    loss = ddpm.loss_fn(lambda x, t, y: x, sched, x0, t, eps, eps_in=eps + gamma * eps_prime)
    assert loss.item() == pytest.approx((xt - eps).pow(2).mean().item(), rel=1e-5)
