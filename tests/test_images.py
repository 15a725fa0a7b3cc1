"""images.py: toy cars, folders of image files and their cache, Stanford Cars layouts."""

import os

import torch

import ddpm
import images
from helpers import SMALL, cli, write_image_folder


def test_toycars_are_seeded_and_in_range():
    a, b = images.toycars(50, 32, seed=1), images.toycars(50, 32, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (50, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, images.toycars(50, 32, seed=2))
    x = ddpm.get_batch(a, torch.arange(8), torch.tensor([True, False] * 4))
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    torch.testing.assert_close(x[0], (a[0].float() / 127.5 - 1).flip(2))  # flipped left-right


def test_image_folder_loader_converts_skips_and_caches(tmp_path, capsys):
    root = tmp_path / "cars"
    write_image_folder(str(root))
    data, _ = images.image_folder(str(root), 16, str(tmp_path / "cache"))
    assert data.shape == (6, 3, 16, 16) and data.dtype == torch.uint8
    assert "skipped 1 unreadable image(s) of 7" in capsys.readouterr().err
    by_name = dict(zip([os.path.basename(p) for p in images.find_images(str(root)) if "broken" not in p], data))
    assert by_name["rgba.png"][:, 8, 8].tolist() == [255, 255, 255]  # transparency lands on white
    assert by_name["grey.jpeg"][:, 8, 8].tolist() == [128, 128, 128]
    assert len(os.listdir(tmp_path / "cache")) == 1
    assert torch.equal(images.image_folder(str(root), 16, str(tmp_path / "cache"))[0], data)  # from the cache
    assert capsys.readouterr().err == ""  # the cache did not decode again


def test_train_on_stanford_cars_layout_from_data_dir(tmp_path):
    write_image_folder(str(tmp_path / "stanford"))
    r = cli("train", *SMALL, "--data", "cars", "--data-dir", "stanford", "--steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable image(s) of 7" in r.stderr and len(os.listdir(tmp_path / "data" / "cache")) == 1
    r = cli("train", *SMALL, "--data", "cars", "--steps", "2", "--out-dir", "env", cwd=tmp_path,
            env={"DDPM_DATA_DIR": str(tmp_path / "stanford")})
    assert r.returncode == 0 and "unreadable" not in r.stderr  # found through $DDPM_DATA_DIR, from the cache
