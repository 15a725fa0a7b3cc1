"""ablate.py: variants at equal training FLOPs, their table, and its flags."""

import dataclasses
import os

import pytest
import torch

import ablate
from test_hostile import refused, run


def test_every_variant_trains_at_the_default_runs_training_flops(tmp_path):
    base, _ = ablate.variant_config("default", 1.0, str(tmp_path), torch.device("cpu"))
    assert base.steps == 2000 and base.warmup == 200
    budget = ablate.forward_flops(base) * base.batch_size * base.steps
    for name in ablate.VARIANTS:
        cfg, flops = ablate.variant_config(name, 0.25, str(tmp_path), torch.device("cpu"))
        assert flops * cfg.batch_size * cfg.steps == pytest.approx(0.25 * budget, rel=0.01), name
        changed = ablate.ddpm.make_config("tiny", **{**ablate.BASE, **ablate.VARIANTS[name]})
        assert cfg.warmup == max(1, round(changed.warmup * cfg.steps / 2000))
    wide, _ = ablate.variant_config("ch64", 1.0, str(tmp_path), torch.device("cpu"))
    small_batch, _ = ablate.variant_config("batch32", 1.0, str(tmp_path), torch.device("cpu"))
    assert wide.steps < 1000 and small_batch.steps == 4000  # a wider net trains fewer steps, a smaller batch more


def test_the_table_ranks_by_fid_and_shows_the_seeds_spread():
    rows = [dict(variant="default", changes={}, budget=1.0, steps=2000, params_M=1.1, fid=30.0, fid_seeds=[29.0, 31.0],
                 fid_ode=100.0, train_s=600.0),
            dict(variant="ch48", changes={"ch": 48}, budget=1.0, steps=900, params_M=2.4, fid=25.0, fid_seeds=[25.0],
                 fid_ode=90.0, train_s=None)]
    lines = ablate.table(rows).splitlines()
    assert lines[2].startswith("| ch48 | ch 48 | 1 | 900 |") and "resumed" in lines[2]
    assert lines[3].startswith("| default | none (the tiny preset before the study) |") and "30.0 ± 1.4" in lines[3] and "10.0 min" in lines[3]


@pytest.mark.parametrize("argv, words", [(["--budget", "0"], ["--budget 0"]), (["--n", "1"], ["--n 1", "covariance"]),
                                         (["--make-crops", "."], ["--data FOLDER"]),
                                         (["--make-crops", "nowhere", "--data", "crops"], ["--make-crops nowhere"]),
                                         (["--only", "huge"], ["--only huge", "ch48"]), (["--seeds", "0"], ["--seeds 0"])])
def test_bad_flags_are_refused(tmp_path, argv, words, monkeypatch, capsys):
    monkeypatch.setitem(__import__("test_hostile").MAINS, "ablate.py", ablate.main)
    refused(*run(["ablate.py", *argv], tmp_path, monkeypatch, capsys), *words)


def test_the_tiny_preset_is_the_variant_the_study_chose():
    # PRESETS["tiny"] is BASE with the chosen variant's changes, at the full budget: the same training, field for
    # field, except where the run writes its files and how often it logs, previews and saves.
    chosen, _ = ablate.variant_config(ablate.CHOSEN, 1.0, "runs", torch.device("cpu"))
    tiny = ablate.ddpm.make_config("tiny")
    skip = {"out_dir", "device", "log_every", "sample_every", "ckpt_every"}
    for field in dataclasses.fields(tiny):
        if field.name not in skip:
            assert getattr(tiny, field.name) == getattr(chosen, field.name), field.name


def test_crops_of_photographs_are_written_reproducibly(tmp_path):
    from PIL import Image
    (tmp_path / "photos").mkdir()
    Image.radial_gradient("L").convert("RGB").resize((300, 200)).save(tmp_path / "photos" / "a.png")
    for name in ("one", "two"):
        ablate.make_crops(str(tmp_path / "photos"), str(tmp_path / name), 5, size=16)
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert written == [f"{i:05d}.png" for i in range(5)]
    for p in written:
        one, two = Image.open(tmp_path / "one" / p), Image.open(tmp_path / "two" / p)
        assert one.size == (16, 16) and one.tobytes() == two.tobytes()
    assert len({Image.open(tmp_path / "one" / p).tobytes() for p in written}) == 5  # five different crops
    (tmp_path / "solid").mkdir()  # a crop that ran past the photo's edge would bring in black
    Image.new("RGB", (300, 200), (200, 50, 50)).save(tmp_path / "solid" / "b.png")
    ablate.make_crops(str(tmp_path / "solid"), str(tmp_path / "three"), 20, size=16)
    assert all(set(Image.open(p).getdata()) == {(200, 50, 50)} for p in (tmp_path / "three").iterdir())


def test_results_on_photographs_are_kept_apart_from_the_toy_cars(tmp_path):
    args = ablate.argparse.Namespace(budget=0.5, data=str(tmp_path / "photo_crops"))
    assert ablate.result_name("default", args) == "default_b0.5_photo_crops.json"
    row = dict(variant="default", changes={}, budget=0.5, steps=1000, params_M=1.1, fid=30.0, fid_seeds=[30.0],
               fid_ode=100.0, train_s=60.0)
    ablate.files.write_json(row, str(tmp_path / "default_b0.5.json"))
    ablate.files.write_json({**row, "data": args.data}, str(tmp_path / "default_b0.5_photo_crops.json"))
    assert len(ablate.load_results(str(tmp_path))) == 1 and len(ablate.load_results(str(tmp_path), data=args.data)) == 1


def test_every_row_of_the_recipe_page_is_a_committed_result():
    """docs/recipe.md's tables are pasted from python ablate.py --table: each row's numbers must be those of its
    result file in results/ablate/ (toy cars or the photographs' crops), so that no number drifts from its file."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    measured = {}
    for data in ("toycars", "data/photo_crops"):
        for line in ablate.table(ablate.load_results(os.path.join(root, "results", "ablate"), data=data)).splitlines()[2:]:
            row = cells(line)
            measured.setdefault((row[0], row[2]), []).append(row[2:])
    with open(os.path.join(root, "docs", "recipe.src.md"), encoding="utf-8") as f:
        rows = [cells(line) for line in f if line.split("|")[1:2] and line.split("|")[1].split()[:1] and
                line.split("|")[1].split()[0] in ablate.VARIANTS]
    assert len(rows) >= 19 + 2 + 2  # the screen, the full budget, the photographs
    for row in rows:
        name = row[0].split()[0]
        assert row[2:] in measured.get((name, row[2]), []), f"recipe row of {name} at budget {row[2]}: {row[2:]}"
