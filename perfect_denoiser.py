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


class ClassDenoiser(torch.nn.Module):
    """The perfect class-conditional eps_theta(x_t, t, y) when class k's data is N(mu_k, s_k^2 I) and the classes
    have weights w_k: class y gets its own Gaussian's eps, and "no class" (y = None or num_classes) the whole
    mixture's. Called as a class-conditional U-Net is, so ddpm.guided() and every sampler take it."""

    def __init__(self, T, mus, stds, weights, beta_1=1e-4, beta_T=0.02):
        super().__init__()
        self.num_classes, self.mixture = len(mus), MixtureDenoiser(T, mus, stds, weights, beta_1, beta_T)
        self.each = [MixtureDenoiser(T, [m], [s], (1.0,), beta_1, beta_T) for m, s in zip(mus, stds)]

    def forward(self, x, t, y=None):
        out = self.mixture(x, t)
        for k in range(self.num_classes if y is not None else 0):
            mine = y == k
            if mine.any():
                out[mine] = self.each[k](x[mine], t[mine])
        return out


def grid(ab, steps, kind="uniform"):
    """The time indices a sampler visits, T-1 down to 0, computed here without ddpm.py: evenly spaced in t, or
    nearest to evenly spaced values of lambda = log(sqrt(ab / (1 - ab))), made distinct by moving crowded
    indices the least way that fits."""
    T = len(ab)
    if kind == "uniform":
        return [int(i) for i in np.round(np.linspace(T - 1, 0, steps))]
    lam = 0.5 * np.log(ab / (1 - ab))
    ts = [int(np.abs(lam - target).argmin()) for target in np.linspace(lam[-1], lam[0], steps)]
    for j in range(steps):  # room above: index j leaves j indices above it
        ts[j] = min(ts[j], T - 1 - j)
    for j in reversed(range(steps - 1)):  # distinct: each above the one after it
        ts[j] = max(ts[j], ts[j + 1] + 1)
    return ts


def exact_moments(sampler, T, mu, s2, steps=None, eta=0.0, var="beta", kind="uniform", beta_1=1e-4, beta_T=0.02):
    """Mean and variance of one value of a sampler's output with the perfect denoiser of N(mu, s2), in
    float64: "ddpm" (Algorithm 2 with sigma^2 = beta or beta_tilde, respaced on `steps` of the T steps),
    "ddim" (eta), "dpm++" (DPM-Solver++(2M)) or "sde-dpm++" (SDE-DPM-Solver++(2M)), on the grid `kind`. The output is tracked as a constant plus
    coefficients on x_T and on each step's fresh noise, all independent N(0, 1)."""
    beta, ab = linear_alpha_bar(T, beta_1, beta_T)
    ts = grid(ab, steps or T, kind)
    nxt = ts[1:] + [-1]
    ab_at = lambda i: 1.0 if i < 0 else ab[i]
    x, b = np.eye(len(ts) + 1)[0], mu * 0.0  # x = x . (x_T, z_1, z_2, ...) + b
    x0_before = h_before = None
    for j, (i, i_next) in enumerate(zip(ts, nxt)):
        a, ap = ab[i], ab_at(i_next)
        k = np.sqrt(1 - a) / (a * s2 + 1 - a)  # eps_pred = k (x - sqrt(a) mu)
        p, q = (1 - np.sqrt(1 - a) * k) / np.sqrt(a), k * np.sqrt(1 - a) * mu  # x0_pred = p x + q
        x0 = (p * x, p * b + q)
        z = np.eye(len(ts) + 1)[j + 1]  # this step's fresh noise
        if sampler == "ddpm":  # the posterior mean at x0_pred (eq. 7) for the step's beta, plus noise but at the end
            bt = 1 - a / ap  # the respaced beta; the schedule's own when all T steps are taken
            c0, ct = np.sqrt(ap) * bt / (1 - a), np.sqrt(1 - bt) * (1 - ap) / (1 - a)
            sigma2 = 0.0 if i_next < 0 else bt if var == "beta" else (1 - ap) / (1 - a) * bt
            x, b = c0 * x0[0] + ct * x + np.sqrt(sigma2) * z, c0 * x0[1] + ct * b
        elif sampler == "ddim":  # eq. 12 with the eps that fits x0_pred
            eps = ((x - np.sqrt(a) * x0[0]) / np.sqrt(1 - a), (b - np.sqrt(a) * x0[1]) / np.sqrt(1 - a))
            sigma2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
            c = np.sqrt(1 - ap - sigma2)
            x, b = np.sqrt(ap) * x0[0] + c * eps[0] + np.sqrt(sigma2) * z, np.sqrt(ap) * x0[1] + c * eps[1]
        elif i_next < 0:  # dpm++ and sde-dpm++, the last step: x_0 is the prediction
            x, b = x0
        else:  # the exponential integrator in lambda with the second-order D (Lu et al. 2022, alg. 2)
            h = 0.5 * np.log(ap / (1 - ap)) - 0.5 * np.log(a / (1 - a))
            w = 0.0 if x0_before is None or h > 2 * h_before else h / (2 * h_before)
            D = x0 if w == 0 else ((1 + w) * x0[0] - w * x0_before[0], (1 + w) * x0[1] - w * x0_before[1])
            if sampler == "dpm++":  # the probability-flow ODE
                r, c, n = np.sqrt((1 - ap) / (1 - a)), -np.sqrt(ap) * np.expm1(-h), 0.0
            else:  # sde-dpm++: the reverse SDE; of x, e^-h stays, the rest of its variance comes back as fresh noise
                r, c = np.sqrt((1 - ap) / (1 - a)) * np.exp(-h), np.sqrt(ap) * (1 - np.exp(-2 * h))
                n = np.sqrt(1 - ap) * np.sqrt(1 - np.exp(-2 * h))
            x, b = r * x + c * D[0] + n * z, r * b + c * D[1]
            x0_before, h_before = x0, h
    return b, float(x @ x)


if __name__ == "__main__":  # the table of docs/walkthrough.md: python perfect_denoiser.py
    s2 = 0.04
    print(f"| sampler | network calls | variance of the output (data: {s2}) | ratio |\n|---|---|---|---|")
    for name, kw, calls in [("Algorithm 2, sigma_t^2 = beta_t", dict(sampler="ddpm", var="beta"), 1000),
                            ("Algorithm 2, sigma_t^2 = beta_tilde_t", dict(sampler="ddpm", var="beta_tilde"), 1000),
                            ("DDIM, eta = 0", dict(sampler="ddim", steps=1000, eta=0.0), 1000),
                            ("DDIM, eta = 1", dict(sampler="ddim", steps=1000, eta=1.0), 1000),
                            ("DDIM, eta = 0", dict(sampler="ddim", steps=50, eta=0.0), 50),
                            ("DDIM, eta = 1", dict(sampler="ddim", steps=50, eta=1.0), 50),
                            ("Algorithm 2 respaced, sigma_t^2 = beta_t", dict(sampler="ddpm", steps=50), 50),
                            ("DDIM, eta = 0, lambda grid", dict(sampler="ddim", steps=20, kind="lambda"), 20),
                            ("DPM-Solver++(2M), lambda grid", dict(sampler="dpm++", steps=20, kind="lambda"), 20),
                            ("DPM-Solver++(2M), lambda grid", dict(sampler="dpm++", steps=10, kind="lambda"), 10),
                            ("SDE-DPM-Solver++(2M), lambda grid", dict(sampler="sde-dpm++", steps=20, kind="lambda"), 20),
                            ("SDE-DPM-Solver++(2M), lambda grid", dict(sampler="sde-dpm++", steps=10, kind="lambda"), 10)]:
        v = exact_moments(T=1000, mu=0.0, s2=s2, **kw)[1]
        print(f"| {name} | {calls} | {v:.4f} | {v / s2:.3f} |")
