"""The docs: the walkthrough is built from the current code, its tags resolve, pictures exist, README runs."""

import os, re, sys

import pytest

from helpers import HERE

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
    for doc, base in (("README.md", HERE), (os.path.join("docs", "walkthrough.md"), os.path.join(HERE, "docs"))):
        with open(os.path.join(HERE, doc)) as f:
            pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", f.read())
        assert pictures, doc
        for p in pictures:
            assert os.path.isfile(os.path.join(base, p)), f"{doc} shows {p}, which does not exist"


def test_readme_python_example_runs():
    with open(os.path.join(HERE, "README.md")) as f:
        block = re.search(r"## Use it from Python\n\n```python\n(.*?)```", f.read(), re.S).group(1)
    scope = {}
    exec(block, scope)
    assert scope["x"].shape == (8, 3, 32, 32) and 0.5 < scope["loss"].item() < 1.5
