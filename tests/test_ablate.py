"""ablate.py: variants at equal training FLOPs, their table, and its flags."""

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
        assert cfg.warmup == max(1, round(ablate.ddpm.make_config("tiny", **ablate.VARIANTS[name]).warmup * cfg.steps / 2000))
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
    assert lines[3].startswith("| default | the tiny preset |") and "30.0 ± 1.4" in lines[3] and "10.0 min" in lines[3]


@pytest.mark.parametrize("argv, words", [(["--budget", "0"], ["--budget 0"]), (["--n", "1"], ["--n 1", "covariance"]),
                                         (["--only", "huge"], ["--only huge", "ch48"]), (["--seeds", "0"], ["--seeds 0"])])
def test_bad_flags_are_refused(tmp_path, argv, words, monkeypatch, capsys):
    monkeypatch.setitem(__import__("test_hostile").MAINS, "ablate.py", ablate.main)
    refused(*run(["ablate.py", *argv], tmp_path, monkeypatch, capsys), *words)
