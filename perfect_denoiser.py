"""The perfect denoiser: the best possible eps_theta for data whose distribution is known, in closed form,
so that the samplers can be checked without training: a fixture for the tests and the pictures, not part
of the model.

For Gaussian data x_0 ~ N(mu, s^2 I), x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps is Gaussian too, jointly with
eps, and the eps_theta that minimizes L_simple is the conditional mean (ab = alpha_bar_t):

    E[eps | x_t] = sqrt(1 - ab) / (ab s^2 + 1 - ab) * (x_t - sqrt(ab) mu).

It is linear in x_t, so every sampler step is linear-Gaussian, x_{t-1} = A x_t + B + sigma z, and the
exact mean and variance of what a sampler returns follow from a float64 recursion (exact_moments). For a
mixture of Gaussians, E[eps | x_t] is the same formula per component, weighted by the component's
posterior probability given x_t (MixtureDenoiser). The schedule is recomputed here in numpy, independently
of ddpm.Schedule.
"""

import numpy as np
import torch


def linear_alpha_bar(T, beta_1=1e-4, beta_T=0.02):
    beta = np.linspace(beta_1, beta_T, T)
    return beta, np.cumprod(1 - beta)


class MixtureDenoiser(torch.nn.Module):
    """eps_theta(x_t, t) = E[eps | x_t] for x_0 ~ sum_k weight_k N(mu_k, s_k^2 I) over all of an image's
    values together. One component is Gaussian data. Call it as the samplers call the U-Net."""

    def __init__(self, T, mus, stds, weights=(1.0,), beta_1=1e-4, beta_T=0.02):
        super().__init__()
        _, ab = linear_alpha_bar(T, beta_1, beta_T)
        self.ab = torch.from_numpy(ab)
        self.mus, self.vars = torch.tensor(mus, dtype=torch.float64), torch.tensor(stds, dtype=torch.float64) ** 2
        self.log_w = torch.tensor(weights, dtype=torch.float64).log()

    def forward(self, x, t):
        x, ab = x.double(), self.ab[t].view(1, -1, 1, 1, 1)  # axis 0: the mixture's components, 1: the batch
        mean, var = ab.sqrt() * self.mus.view(-1, 1, 1, 1, 1), ab * self.vars.view(-1, 1, 1, 1, 1) + 1 - ab
        # each component's eps estimate, and its posterior probability from the marginal N(mean, var I) of x_t
        eps_k = (1 - ab).sqrt() / var * (x - mean)
        if len(self.mus) == 1:  # one Gaussian: no weighing needed
            return eps_k[0].float()
        log_p = self.log_w.view(-1, 1) - 0.5 * (((x - mean) ** 2 / var) + var.log()).flatten(2).sum(2)
        post = torch.softmax(log_p, dim=0).view(*log_p.shape, 1, 1, 1)
        return (post * eps_k).sum(0).float()


def exact_moments(sampler, T, mu, s2, steps=None, eta=0.0, var="beta", beta_1=1e-4, beta_T=0.02):
    """Mean and variance of one value of a sampler's output with the perfect denoiser of N(mu, s2), in
    float64: sampler "ddpm" (Algorithm 2, sigma_t^2 = beta_t or beta_tilde_t) or "ddim" (eta, steps)."""
    beta, ab = linear_alpha_bar(T, beta_1, beta_T)
    ab_at = lambda i: 1.0 if i < 0 else ab[i]
    if sampler == "ddpm":
        ts = list(range(T - 1, -1, -1))
    else:
        ts = list(dict.fromkeys(np.round(np.linspace(T - 1, 0, steps)).astype(int).tolist()))
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for j, i in enumerate(ts):
        a = ab[i]
        k = np.sqrt(1 - a) / (a * s2 + 1 - a)  # eps_pred = k (x - sqrt(a) mu)
        p, q = (1 - np.sqrt(1 - a) * k) / np.sqrt(a), k * np.sqrt(1 - a) * mu  # x0_pred = p x + q
        if sampler == "ddpm":  # the posterior mean at x0_pred (eq. 7), plus noise except at the last step
            ap = ab_at(i - 1)
            c0, ct = np.sqrt(ap) * beta[i] / (1 - a), np.sqrt(1 - beta[i]) * (1 - ap) / (1 - a)
            A, B = c0 * p + ct, c0 * q
            sigma2 = 0.0 if i == 0 else beta[i] if var == "beta" else (1 - ap) / (1 - a) * beta[i]
        else:  # DDIM eq. 12 with the eps that fits x0_pred
            ap = ab_at(ts[j + 1] if j + 1 < len(ts) else -1)
            ep, eq = (1 - np.sqrt(a) * p) / np.sqrt(1 - a), -np.sqrt(a) * q / np.sqrt(1 - a)
            sigma2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
            c = np.sqrt(1 - ap - sigma2)
            A, B = np.sqrt(ap) * p + c * ep, np.sqrt(ap) * q + c * eq
        m, v = A * m + B, A * A * v + sigma2
    return m, v


if __name__ == "__main__":  # the table of docs/walkthrough.md: python perfect_denoiser.py
    s2 = 0.04
    print(f"| sampler | network calls | variance of the output (data: {s2}) | ratio |\n|---|---|---|---|")
    for name, kw, calls in [("Algorithm 2, sigma_t^2 = beta_t", dict(sampler="ddpm", var="beta"), 1000),
                            ("Algorithm 2, sigma_t^2 = beta_tilde_t", dict(sampler="ddpm", var="beta_tilde"), 1000),
                            ("DDIM, eta = 0", dict(sampler="ddim", steps=1000, eta=0.0), 1000),
                            ("DDIM, eta = 1", dict(sampler="ddim", steps=1000, eta=1.0), 1000),
                            ("DDIM, eta = 0", dict(sampler="ddim", steps=50, eta=0.0), 50),
                            ("DDIM, eta = 1", dict(sampler="ddim", steps=50, eta=1.0), 50)]:
        v = exact_moments(T=1000, mu=0.0, s2=s2, **kw)[1]
        print(f"| {name} | {calls} | {v:.4f} | {v / s2:.3f} |")
