"""What the tests share: the project's folder, tiny training flags, and running a command as a user would."""

import os, subprocess, sys

import torch
from PIL import Image

import ddpm

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
# A tiny network for tests; --lr 0.001 keeps the learning rate these tests and their fixtures were made with,
# the tiny preset's before docs/recipe.md moved it to 2e-3.
SMALL = ["--image-size", "16", "--ch", "8", "--ch-mult", "1,2", "--attn-res", "8", "--T", "20",
         "--n-toycars", "64", "--batch-size", "8", "--warmup", "2", "--log-every", "2",
         "--sample-every", "1000", "--ckpt-every", "1000", "--lr", "0.001"]


def cli(*args, cwd, env=None):
    """Run a command as a user would: `ddpm.py ARGS`, or `SCRIPT.py ARGS` when the first argument names
    another of the project's scripts (evaluate.py, plots.py). Returns the finished process."""
    script, args = (args[0], args[1:]) if str(args[0]).endswith(".py") else ("ddpm.py", args)
    env = {**os.environ, "DDPM_DATA_DIR": "", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def small_cfg(**kw):
    """A tiny network on the Config defaults (not the tiny preset's batch and learning rate, which may move)."""
    return ddpm.Config(**{"image_size": 16, "ch": 8, "ch_mult": (1, 2), "attn_res": (8,), "T": 20, **kw})


def weights(path):
    return torch.load(path, weights_only=True)


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


def run_main(main, argv, cwd, monkeypatch, capsys):
    """main(argv) in cwd; returns (exit code, stderr). A traceback would be an exception here."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DDPM_DATA_DIR", "")
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err
