"""Training runs: micro-batches, resume, seeds, torchrun, and the runs of the code before the split."""

import csv, os, shutil, subprocess, sys

import numpy as np
import torch

import ddpm
import images
from helpers import HERE, SMALL, cli, small_cfg, weights


def test_micro_batches_take_the_whole_batch_step():
    # Chunks of 3, 3 and 2 images, their mean losses weighted 3/8, 3/8 and 2/8, must train like the batch
    # of 8 in one pass: same losses, gradients and weights over three steps (fp32, no dropout).
    cfg = small_cfg(batch_size=8, precision="fp32", dropout=0.0)
    x0 = ddpm.get_batch(images.toycars(8, 16), torch.arange(8), torch.zeros(8, dtype=torch.bool))
    runs = []
    for micro in (8, 3):  # 8: the whole batch in one pass, whatever the CPU default would pick
        s = ddpm.setup(cfg, torch.device("cpu"), micro_batch=micro)
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


# ---------------------------------------------------------------- the code before the split (tests/fixtures)

FIXTURES = os.path.join(HERE, "tests", "fixtures")


def test_a_checkpoint_of_the_code_before_the_split_samples_and_resumes(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    shutil.copy(os.path.join(FIXTURES, "ckpt_before_split.pt"), run / "ckpt.pt")
    r = cli("sample", "--ckpt", run / "ckpt.pt", "--n", "4", "--sampler", "ddim", "--steps", "3", cwd=tmp_path)
    assert r.returncode == 0 and "EMA weights of step 4" in r.stdout, r.stderr
    r = cli("train", "--resume", "--steps", "6", "--out-dir", run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert weights(run / "ckpt.pt")["step"] == 6


def test_the_same_run_logs_the_same_losses_as_before_the_split(tmp_path):
    # Recorded by the code before the split (tests/fixtures/README.md). On the machine that recorded it the
    # two columns are equal to the last digit; the tolerance leaves room for another CPU's fp32 rounding,
    # far below what a change in the random draws or the loss would move (about 1e-2 per row).
    r = cli("train", *SMALL, "--steps", "30", "--dropout", "0.1", "--precision", "fp32", "--out-dir", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    read = lambda path: [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(open(path))]
    now, before = read(tmp_path / "run" / "log.csv"), read(os.path.join(FIXTURES, "run30_fp32_loss.csv"))
    assert [s for s, _ in now] == [s for s, _ in before] == list(range(2, 31, 2))
    assert max(abs(a - b) for (_, a), (_, b) in zip(now, before)) < 2e-4


def test_the_options_beyond_the_paper_draw_only_when_on_and_feed_the_network_their_x_t():
    # With both off a step draws t and eps and nothing more (a default run keeps its bits); with input
    # perturbation on, the network is fed x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) (eps + gamma eps'),
    # eps' the draw after t and eps, all redrawn here from a generator of the same seed.
    x0 = ddpm.get_batch(images.toycars(8, 16), torch.arange(8), torch.zeros(8, dtype=torch.bool))
    for gamma in (0.0, 0.1):
        s = ddpm.setup(small_cfg(batch_size=8, precision="fp32", input_perturbation=gamma), torch.device("cpu"),
                       micro_batch=8)
        seen, net = [], s.net
        s.net = lambda x, t, y: seen.append((x.clone(), t.clone())) or net(x, t, y)
        ddpm.train_step(s, x0, 1)
        g = torch.Generator().manual_seed(s.cfg.seed)
        t, eps = torch.randint(0, 20, (8,), generator=g), torch.randn(x0.shape, generator=g)
        eps_prime = torch.randn(x0.shape, generator=g) if gamma else torch.zeros_like(eps)
        assert torch.equal(g.get_state(), s.noise_generator.get_state())  # the same draws, and no more
        a = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 20))[t.numpy()]).float().view(-1, 1, 1, 1)
        assert torch.equal(seen[0][1], t)
        torch.testing.assert_close(seen[0][0], a.sqrt() * x0 + (1 - a).sqrt() * (eps + gamma * eps_prime))
