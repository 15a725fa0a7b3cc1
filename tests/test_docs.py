"""The docs: the walkthrough is built from the current code, its tags resolve, pictures exist, README runs."""

import glob, os, re, sys

import pytest

from helpers import HERE

sys.path.insert(0, os.path.join(HERE, "docs"))
import build as docs_build  # noqa: E402


def test_every_chapter_is_built_from_the_current_code():
    # build() itself fails on a tag that is missing, doubled, or never used by the docs, in any project file.
    chapters = docs_build.build()
    assert os.path.join(HERE, "docs", "walkthrough.md") in map(str, chapters)
    for path, text in chapters.items():
        with open(path) as f:
            assert f.read() == text, f"{path} is stale: run python docs/build.py"


def test_the_side_by_side_page_is_current_typeset_by_katex_and_every_link_on_a_line():
    # Built here and compared byte for byte with the committed page; tests/test_reader.py opens it in a browser.
    pytest.importorskip("markdown", reason="pip install -r requirements-docs.txt")
    chapters = docs_build.build()
    pages = docs_build.build_html(chapters)
    if not pages and os.environ.get("CI"):
        pytest.fail("CI must build the HTML pages: npm ci --prefix docs")
    if not pages:
        pytest.skip("KaTeX is missing: npm ci --prefix docs")
    for path, page in pages.items():
        with open(path, "rb") as f:
            assert f.read() == (page if isinstance(page, bytes) else page.encode()), f"{path} is stale: run python docs/build.py"
        if path.suffix != ".html":
            continue
        markdown_text = chapters[path.with_suffix(".md")]
        prose = page[page.index('<div id="prose">'):]
        prose = prose[:prose.index('<div id="code">')] if '<div id="code">' in prose else prose
        prose = re.sub(r'<nav id="toc">.*?</nav>', "", prose, flags=re.S)
        outside = re.sub(r'<pre>.*?</pre>|<code>.*?</code>|<span class="katex">.*?</annotation>', "", prose, flags=re.S)
        assert "$" not in outside, "an equation was left as LaTeX"
        no_code = docs_build.CODE_SPAN.sub("", docs_build.FENCE.sub("", markdown_text))
        equations = len(docs_build.DISPLAY.findall(no_code)) + len(docs_build.INLINE_MATH.findall(docs_build.DISPLAY.sub("", no_code)))
        assert prose.count('<span class="katex">') == equations
        assert equations > {"walkthrough": 100, "mistakes": 10}.get(path.stem, -1)
        lines = set(re.findall(r'<span id="([\w.]+-L\d+)">', page))
        links = re.findall(r'href="#([\w./]+)-L\d+" class="code" data-file="([\w./]+)" data-first="(\d+)" data-last="(\d+)"', page)
        assert len(links) == len(re.findall(r"\]\(\.\./[\w/]+\.py#L", markdown_text))
        for _, file, first, last in links:
            assert f"{file}-L{first}" in lines and f"{file}-L{last}" in lines, (file, first, last)


def test_docs_links_point_into_any_project_file():
    code = docs_build.Code()
    ref, file, first, last = code.link("evaluate.py: def decoder_nll")
    assert file == "evaluate.py" and ref.startswith("[`decoder_nll` in `evaluate.py` L") and "(../evaluate.py#L" in ref
    assert code.files["evaluate.py"][first].startswith("def decoder_nll")
    with pytest.raises(SystemExit, match="not a file of the project"):
        code.link("nowhere.py: def f")


def test_docs_tags_must_exist_exactly_once():
    lines = ["def f():", "    # [eq. 4] once", "    x = 1", "", "    y = 2  # [eq. 7] twice", "    z = 3  # [eq. 7] again"]
    assert docs_build.locate(lines, "eq. 4") == (1, 2)
    assert docs_build.locate(lines, "def f") == (0, 5)
    for name in ("eq. 7", "eq. 99", "def g"):
        with pytest.raises(SystemExit):
            docs_build.locate(lines, name)


def test_every_picture_the_docs_show_exists():
    chapters = [(os.path.join("docs", name), os.path.join(HERE, "docs"))
                for name in sorted(os.listdir(os.path.join(HERE, "docs"))) if name.endswith(".src.md")]
    for doc, base in [("README.md", HERE)] + chapters:
        with open(os.path.join(HERE, doc)) as f:
            pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", f.read())
        assert pictures or doc != "README.md"
        for p in pictures:
            assert os.path.isfile(os.path.join(base, p)), f"{doc} shows {p}, which does not exist"


def test_the_readme_is_short_links_every_chapter_and_every_link_of_the_docs_lands():
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    docs = os.path.join(HERE, "docs")
    chapters = sorted(name[:-len(".src.md")] for name in os.listdir(docs) if name.endswith(".src.md"))
    for name in chapters:
        assert f"(docs/{name}.md)" in readme and f"(docs/{name}.html)" in readme, f"the README does not link {name}"
    for doc, base in [("README.md", HERE)] + [(os.path.join("docs", n + ".md"), docs) for n in chapters]:
        with open(os.path.join(HERE, doc)) as f:
            targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read())
        for target in targets:
            if not target.startswith(("http://", "https://")):
                assert os.path.exists(os.path.join(base, target)), f"{doc} links {target}, which does not exist"


def test_readme_python_example_runs():
    with open(os.path.join(HERE, "README.md")) as f:
        block = re.search(r"## Use it from Python\n\n```python\n(.*?)```", f.read(), re.S).group(1)
    scope = {}
    exec(block, scope)
    assert scope["x"].shape == (8, 3, 32, 32) and 0.5 < scope["loss"].item() < 1.5


def test_the_right_lines_the_mistakes_chapter_quotes_are_in_the_code():
    # The chapter shows each wrong line by its tag (generated) and quotes the right line, which has no tag of its own
    # for most of them; every quoted "Right:" line must still be in the project's code (not mistakes.py) word for word.
    with open(os.path.join(HERE, "docs", "mistakes.src.md")) as f:
        quoted = re.findall(r"^\*\*Right:\*\* `([^`]+)`", f.read(), re.M)
    code = [open(p).read() for p in glob.glob(os.path.join(HERE, "*.py")) if not p.endswith("mistakes.py")]
    assert len(quoted) >= 8
    for line in quoted:
        assert any(line in text for text in code), line


def test_the_samplers_tables_are_the_committed_sweep_results():
    """docs/samplers.md's two tables are python sweep.py --table of results/sweep/ (the current preset's run) and
    results/sweep-c0d4eca/ (the old preset's), with the samplers' names written out and some cells in bold."""
    sys.path.insert(0, HERE)
    import sweep
    names = {"Algorithm 2 (respaced below 1000)": "ddpm", "DDIM, eta = 0": "ddim-eta0", "DDIM, eta = 1": "ddim-eta1",
             "DPM-Solver++(2M), log-SNR grid": "dpm++", "DPM-Solver++(2M), grid even in t": "dpm++-uniform",
             "SDE-DPM-Solver++(2M), log-SNR grid": "sde-dpm++"}
    with open(os.path.join(HERE, "docs", "samplers.src.md"), encoding="utf-8") as f:
        rows = [[c.strip().replace("**", "") for c in line.strip().strip("|").split("|")] for line in f
                if line.split("|")[1:2] and line.split("|")[1].strip() in names]
    tables = [[[c.strip() for c in line.strip().strip("|").split("|")] for line in
               sweep.table(sweep.load_results(os.path.join(HERE, "results", folder))).splitlines()[2:]]
              for folder in ("sweep", "sweep-c0d4eca")]
    assert len(rows) == len(tables[0]) + len(tables[1]) == 11
    for row, want in zip(rows, tables[0] + tables[1]):
        assert [names[row[0]]] + row[1:] == want, row[0]
