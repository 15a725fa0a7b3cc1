"""The commands end to end, as a user runs them: train, sample, Ctrl-C, and bad input of every kind."""

import os, pickle, signal, subprocess, sys, time

import torch
from PIL import Image

import files
from helpers import HERE, SMALL, cli, write_image_folder


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
    ckpt = files.load_checkpoint(str(tmp_path / "runs" / "tiny" / "ckpt.pt"))
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
        ("bad schedule", ["train", "--schedule", "square"], ["--schedule square", "linear or cosine"]),
        ("negative micro-batch", ["train", "--micro-batch", "-1"], ["--micro-batch"]),
        ("unknown preset", ["train", "--preset", "huge"], ["tiny, cars64, paper32"]),
        ("sample, no checkpoint", ["sample", "--ckpt", "missing.pt"], ["no checkpoint"]),
        ("evaluate.py, no checkpoint", ["evaluate.py", "--ckpt", "missing.pt"], ["no checkpoint"]),
        ("plots.py, no checkpoint", ["plots.py", "--ckpt", "missing.pt"], ["no checkpoint"]),
        ("evaluate.py, truncated checkpoint", ["evaluate.py", "--ckpt", "truncated.pt"], ["truncated"]),
        ("truncated checkpoint", ["sample", "--ckpt", "truncated.pt"], ["truncated"]),
        ("text as checkpoint", ["sample", "--ckpt", "text.pt"], ["could not read"]),
        ("torch file, not ours", ["sample", "--ckpt", "other.pt"], ["not a ddpm.py checkpoint"]),
        ("pickled code", ["sample", "--ckpt", "evil.pt"], ["refused"]),
        ("pickled code in a torch file", ["sample", "--ckpt", "evil2.pt"], ["refused"]),
        ("weights from another config", ["sample", "--ckpt", "wrong.pt"], ["another config"]),
        ("resume with another network", ["train", *SMALL, "--resume", "--out-dir", ok, "--ch", "16"], ["--ch (it was trained with 8)"]),
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
    assert files.load_checkpoint(str(tmp_path / "ok" / "ckpt.pt"))["step"] == 2  # nothing lost
