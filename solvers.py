"""Solvers beyond DDIM for the network ddpm.py trains: few network calls, second order, with noise or without.

A companion to ddpm.py, read after its DDIM (docs/walkthrough.md, section 10), written in its style and
importing nothing of the project, so that it reads alone. Each solver takes the network eps_theta(x, t) of
ddpm.py, the schedule's alpha_bar as a (T,) tensor (float64; ddpm.Schedule holds it) and the descending time
indices ts where it calls the network (ddpm.timesteps makes them). `python ddpm.py sample --sampler dpm++`
(or sde-dpm++) calls them through ddpm.draw.
"""

import torch


@torch.no_grad()
def dpm_solver_sample(model, alpha_bar, ts, shape, generator=None, device="cpu", sde=False, order=2):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), multistep: the probability-flow ODE solved in
    lambda with the network's x_0, corrected to second order with the x_0 of the step before. sde=True:
    SDE-DPM-Solver++(2M) of the same paper, the reverse SDE solved the same way, with fresh noise at every
    step but the last, which forgives a network's errors where the ODE carries them to the end. With the
    correction off (order=1) they are DDIM with eta = 0 and eta = 1 on the same grid. Returns x_0."""
    ts, x0_before = ts.tolist(), None
    x = torch.randn(shape, device=device, generator=generator)
    for t, t_next in zip(ts, ts[1:] + [-1]):  # -1: the last step lands on x_0
        t_batch = torch.full((shape[0],), t, device=device)
        a_bar = alpha_bar[t_batch].view(-1, 1, 1, 1)
        # eq. 4 solved for x_0 at the network's eps, clipped to [-1, 1] as ddpm.p_sample does
        x0 = ((x - (1 - a_bar).sqrt() * model(x, t_batch).float()) / a_bar.sqrt()).float().clamp(-1, 1)
        if t_next < 0:  # the last step, to lambda = infinity, is first order: x_0 is the prediction itself
            return x0
        a_bar_next = alpha_bar[torch.full_like(t_batch, t_next)].view(-1, 1, 1, 1)
        # [dpm++ h] the step in lambda = log(a / b), a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)
        h = 0.5 * ((a_bar_next / (1 - a_bar_next)).log() - (a_bar / (1 - a_bar)).log())
        # [dpm++ 2M] D = (1 + 1/(2r)) x0 - 1/(2r) x0_before, r = h_before / h; first order where r < 1/2
        first_order = order == 1 or x0_before is None or (h > 2 * h_before).any()
        D = x0 if first_order else x0 + (x0 - x0_before) * h / (2 * h_before)
        if not sde:
            # [dpm++ step] x_next = b_next / b x - a_next (e^-h - 1) D
            x_next = ((1 - a_bar_next) / (1 - a_bar)).sqrt() * x - a_bar_next.sqrt() * torch.expm1(-h) * D
        else:
            # [sde-dpm++ step] x_next = b_next / b e^-h x + a_next (1 - e^-2h) D + b_next sqrt(1 - e^-2h) z
            z = torch.randn(shape, device=device, generator=generator)
            keep, fresh = torch.exp(-h), -torch.expm1(-2 * h)  # e^-h; 1 - e^-2h, the share of fresh noise
            b_ratio, b_next = ((1 - a_bar_next) / (1 - a_bar)).sqrt(), (1 - a_bar_next).sqrt()
            x_next = b_ratio * keep * x + a_bar_next.sqrt() * fresh * D + b_next * fresh.sqrt() * z

        x, x0_before, h_before = x_next.float(), x0, h  # the float64 schedule made x_next float64
