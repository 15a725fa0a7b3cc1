"""The gallery of mistakes (mistakes.py): each broken version is the mistake it claims to be, checked against an
independent calculation where one exists (the perfect denoiser of Gaussian data, numpy, torchvision's own
save_image), and the gallery command runs end to end at a toy size."""

import json, math, os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import evaluate
import mistakes
from helpers import small_cfg
from perfect_denoiser import MixtureDenoiser, exact_moments, linear_alpha_bar

SHAPE = (256, 1, 4, 4)


def gaussian(s):
    """The schedule (T = 1000) and the perfect network for x_0 ~ N(0, s^2)."""
    return ddpm.Schedule(ddpm.linear_beta(1000)), MixtureDenoiser(1000, [0.0], [s])


def run(sampler, sched, net, seed=0):
    return sampler(net, sched, SHAPE, torch.Generator().manual_seed(seed), "cpu").double()


def test_the_right_sampler_is_ddim_with_eta_1():
    sched, net = gaussian(0.5)
    ddim, _ = ddpm.ddim_sample(net, sched, SHAPE, mistakes.STEPS, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(run(mistakes.right, sched, net), ddim.double(), atol=1e-5)


def test_no_clip_leaves_x0_outside_the_data_range():
    # Data N(0, 2^2) lies mostly outside [-1, 1]. The right sampler's last step returns the clipped x_0, so it
    # never leaves [-1, 1]; without the clip the samples have the variance that the exact float64 recursion of
    # the unclipped sampler gives (near the data's 4; 50 steps are not exact).
    sched, net = gaussian(2.0)
    assert run(mistakes.right, sched, net).abs().max() <= 1
    _, var = exact_moments("ddpm", 1000, 0.0, 4.0, mistakes.STEPS, var="beta_tilde")
    assert run(mistakes.no_clip, sched, net).var().item() == pytest.approx(var, rel=0.08)


def test_eps_kept_matters_only_where_clipping_acts():
    # Narrow data (s = 0.2): x_0 is never clipped, so keeping eps changes nothing. Wide data: clipped x_0 and the
    # network's eps disagree, and the samples differ from the right ones.
    for s, same in [(0.2, True), (2.0, False)]:
        sched, net = gaussian(s)
        right, kept = run(mistakes.right, sched, net), run(mistakes.ddim_eps_kept, sched, net)
        assert torch.allclose(right, kept, atol=1e-5) == same


class Stop(Exception):
    pass


def test_one_eps_kept_step_drops_what_the_clip_cut_off():
    # The first DDIM step (eta = 0, 3 steps: t = 999 to 500) on data N(3, 0.5^2), whose x_0 the clip cuts. The right step
    # recomputes eps from the clipped
    # x_0, which puts a share of the cut-off part back: wrong - right = sqrt(1 - ab') sqrt(ab / (1 - ab)) (x0_clipped - x0).
    # Both samplers take the step themselves; the network sees the result at its second call. numpy predicts it.
    mu, s2 = 3.0, 0.25
    sched, net = ddpm.Schedule(ddpm.linear_beta(1000)), MixtureDenoiser(1000, [mu], [math.sqrt(s2)])
    shape = (4096, 1, 1, 1)

    def first_step(sampler):
        seen = []
        def spy(x, t):
            seen.append(x.double().numpy().ravel())
            if len(seen) == 2:
                raise Stop
            return net(x, t)
        with pytest.raises(Stop):
            sampler(spy, torch.Generator().manual_seed(0))
        return seen
    x_T, right = first_step(lambda m, g: ddpm.ddim_sample(m, sched, shape, 3, 0.0, g))
    with mistakes.patched(mistakes, "STEPS", 3):
        _, wrong = first_step(lambda m, g: mistakes.ddim_eps_kept(m, sched, shape, g, "cpu", eta=0.0))
    t, t_next = ddpm.timesteps(sched, 3).tolist()[:2]
    _, ab = linear_alpha_bar(1000)
    a, a1 = ab[t], ab[t_next]
    eps = np.sqrt(1 - a) / (a * s2 + 1 - a) * (x_T - np.sqrt(a) * mu)  # the perfect denoiser's eps, and its x_0
    x0 = (x_T - np.sqrt(1 - a) * eps) / np.sqrt(a)
    predicted = np.sqrt(1 - a1) * np.sqrt(a / (1 - a)) * (np.clip(x0, -1, 1) - x0)
    assert np.abs(predicted).max() > 0.01  # the clip acts
    np.testing.assert_allclose(wrong - right, predicted, atol=1e-4)


def test_last_noise_adds_exactly_sigma_1_z_at_the_end():
    # Same noise up to the last step; then the broken sampler adds sqrt(beta_1) z: the difference has variance beta_1.
    sched, net = gaussian(0.5)
    diff = run(mistakes.last_noise, sched, net) - run(mistakes.right, sched, net)
    assert diff.var().item() == pytest.approx(1e-4, rel=0.1)
    assert diff.mean().abs().item() < 5 * 1e-2 / math.sqrt(diff.numel())


class Spy(torch.nn.Module):
    """Records the time indices a sampler feeds the network, and predicts eps = 0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, *y):
        self.seen.append(int(t[0]))
        return torch.zeros_like(x)


def test_off_by_one_and_wrong_way_feed_the_network_the_claimed_steps():
    sched, ts = ddpm.Schedule(ddpm.linear_beta(1000)), ddpm.timesteps(ddpm.Schedule(ddpm.linear_beta(1000)), mistakes.STEPS).tolist()
    for sampler, expected in [(mistakes.right, ts), (mistakes.off_by_one, [t + 1 for t in ts]), (mistakes.wrong_way, ts[::-1]),
                              (mistakes.original_betas, ts)]:
        spy = Spy()
        run(sampler, sched, spy)
        assert spy.seen == expected, sampler.__name__


def test_original_betas_leave_the_noise_in_as_a_separate_recursion_predicts():
    # With the perfect denoiser every step is linear: x <- (c0 k + c1) x + sqrt(beta_tilde_t) z, where x_0 = k x_t is the
    # denoiser's prediction and c0, c1 the posterior's coefficients at index t of the ORIGINAL schedule. numpy, float64.
    # Unclipped, so that every step is exactly linear (with the clip the broken sampler's last x_0 is cut off too).
    s = 0.2
    sched, net = gaussian(s)
    beta, ab = linear_alpha_bar(1000)
    var = 1.0
    for t in ddpm.timesteps(sched, mistakes.STEPS).tolist():
        ab_prev = ab[t - 1] if t > 0 else 1.0
        k = np.sqrt(ab[t]) * s ** 2 / (ab[t] * s ** 2 + 1 - ab[t])
        c0, c1 = np.sqrt(ab_prev) * beta[t] / (1 - ab[t]), np.sqrt(1 - beta[t]) * (1 - ab_prev) / (1 - ab[t])
        var = (c0 * k + c1) ** 2 * var + (1 - ab_prev) / (1 - ab[t]) * beta[t]
    unclipped = lambda *a: mistakes.P_SAMPLE(*a, clip=False)
    with mistakes.patched(ddpm, "p_sample", unclipped):
        broken = run(mistakes.original_betas, sched, net)
    assert var > 10 * s ** 2  # far more variance than the data's: noise left in
    assert broken.var().item() == pytest.approx(var, rel=0.08)
    _, right_var = exact_moments("ddpm", 1000, 0.0, s ** 2, mistakes.STEPS, var="beta_tilde")  # the right sampler, for contrast
    assert run(mistakes.right, sched, net).var().item() == pytest.approx(right_var, rel=0.08) and right_var < 1.1 * s ** 2


def test_saved_as_0_1_is_what_torchvision_save_image_writes(tmp_path):
    from torchvision.utils import save_image
    x = torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8)
    save_image(x, tmp_path / "wrong.png")  # the mistake itself: [-1, 1] given to a function that expects [0, 1]
    written = torch.from_numpy(np.array(Image.open(tmp_path / "wrong.png"))).permute(2, 0, 1)
    assert torch.equal(written, evaluate.to_uint8(mistakes.saved_as_0_1(x))[0])
    assert (written[x[0] < 0] == 0).all()  # every value below 0 black


def test_the_training_mistakes_change_what_they_claim():
    data = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    generator = lambda: torch.Generator().manual_seed(0)
    right = ddpm.random_batch(data, 16, generator())[0]
    with mistakes.patched(ddpm, "get_batch", mistakes.get_batch_0_1):
        x = ddpm.random_batch(data, 16, generator())[0]
    assert x.min() >= 0 and x.max() <= 1 and torch.allclose(x * 255, (right + 1) * 127.5, atol=1e-4)  # [0, 1], as ToTensor() gives
    assert ddpm.get_batch is mistakes.GET_BATCH  # and put back

    # t / T: the codes of all 1000 steps nearly alike. With the index, 22 of tiny's 32 components swing over at least
    # half their range [-1, 1] across the steps; with t / T none does, and 26 move by less than 0.1.
    cfg = mistakes.run_config("t-over-T", "runs", 10, "cpu")[0]
    t = torch.arange(cfg.T)
    swing = lambda emb: emb.max(0).values - emb.min(0).values
    with mistakes.t_over_T(cfg):
        over_T = swing(ddpm.timestep_embedding(t, cfg.ch))
    index = swing(ddpm.timestep_embedding(t, cfg.ch))
    assert (index >= 1).sum() >= 20 and (over_T >= 1).sum() == 0 and (over_T < 0.1).sum() >= 24

    # T = 100 with the betas of T = 1000: x_T keeps sqrt(alpha_bar_T) = 0.6 of the image (numpy: prod(1 - beta)).
    small = mistakes.run_config("small-T", "runs", 10, "cpu")[0]
    ab_T = ddpm.Schedule.from_config(small).alpha_bar[-1].item()
    assert ab_T == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 100)), rel=1e-12) and ab_T > 0.35
    assert ddpm.Schedule.from_config(cfg).alpha_bar[-1].item() < 1e-4  # T = 1000: x_T is pure noise

    cfg, const = (mistakes.run_config(name, "runs", 1000, "cpu")[0] for name in ("correct", "const-lr"))
    assert ddpm.lr_at(const.steps, const) == const.lr and ddpm.lr_at(cfg.steps, cfg) < 1e-3 * cfg.lr


# The toy gallery: T = 20, so its small-T run (T = 100) is not smaller; it checks the command, not the mistake.
TOY = dict(image_size=16, ch=8, ch_mult=(1, 2), attn_res=(8,), T=20, n_toycars=64, batch_size=8, warmup=2,
           log_every=2, sample_every=1000, ckpt_every=1000)


@pytest.mark.skipif(evaluate.inception() is None, reason="needs the Inception weights (requirements-eval.txt)")
def test_the_gallery_runs_end_to_end_and_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mistakes, "BASE", {**mistakes.BASE, **TOY})
    args = ["--steps", "4", "--n", "4", "--n-ref", "8", "--batch", "4", "--out", "r", "--runs", "runs", "--picture", "g.png"]
    mistakes.main(args + ["--only", "no-clip,small-T"])
    out = capsys.readouterr().out
    assert "2 training runs (correct, small-T)" in out and "about" in out
    assert sorted(os.listdir("r")) == ["images", "no-clip.json", "right.json", "small-T.json"]
    mistakes.main(args)  # the rest; what is done is not done again
    out = capsys.readouterr().out
    assert "correct" not in out.split("to do:")[1].split(")")[0] and "no-clip " not in out
    results = mistakes.load_results("r")
    assert set(results) == set(mistakes.MISTAKES) | {"right", "const-lr-ema", "fp16"}
    assert all(math.isfinite(r["fid"]) and r["n"] == 4 for k, r in results.items() if k != "fp16")
    assert results["fp16"]["fp16"]["relative_error"] > results["fp16"]["fp16_scaled"]["relative_error"]  # undone by the scale
    assert f"wrote g.png: {len(mistakes.MISTAKES)} mistakes" in out and Image.open("g.png").size[1] > 12 * 16
    assert mistakes.table(results).count("\n| ") == len(mistakes.MISTAKES)  # a row each, after the header
    mistakes.main(args)
    assert "all done" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # other settings than the results in r/ were made with
        mistakes.main(args[:1] + ["5"] + args[2:])
    assert e.value.code == 2 and "--steps 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        mistakes.main(args + ["--only", "no-such"])
    assert e.value.code == 2 and "the mistakes are" in capsys.readouterr().err
