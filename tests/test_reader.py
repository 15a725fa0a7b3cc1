"""The HTML reader, opened in a real browser (headless Chromium) from the file system, as a reader would.

Each test copies a page next to itself with one probe script added, lets Chromium run it, and reads the probe's
JSON back from the page it dumps. Chromium is Debian's `chromium` package; .ci/run installs it, and in CI a
missing browser fails the test instead of skipping it."""

import json, os, re, shutil, subprocess, sys

import pytest

from helpers import HERE

DOCS = os.path.join(HERE, "docs")
sys.path.insert(0, DOCS)
import build as docs_build  # noqa: E402
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def chapters():
    return sorted(f[:-len(".src.md")] for f in os.listdir(DOCS) if f.endswith(".src.md"))


def run_in_page(page, probe, width=1400, height=900):
    """Open docs/PAGE.html in headless Chromium with `probe` (JavaScript that ends by calling report(value))
    added at the end of its body; returns the value."""
    if BROWSER is None:
        if os.environ.get("CI"):
            pytest.fail("CI must test the reader in a browser: apt-get install chromium")
        pytest.skip("no Chromium here: apt-get install chromium")
    with open(os.path.join(DOCS, page + ".html")) as f:
        html = f.read()
    script = ("<script>function report(v) { const p = document.createElement('pre'); p.id = 'probe';"
              " p.textContent = JSON.stringify(v); document.body.appendChild(p); }\n"
              f"addEventListener('load', async () => {{ {probe} }});</script>")
    copy = os.path.join(DOCS, f"{page}.tmp-probe.html")  # beside the page, so that katex/ resolves as it does
    try:
        with open(copy, "w") as f:
            f.write(html.replace("</body>", script + "</body>"))
        run = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                              f"--window-size={width},{height}", "--virtual-time-budget=20000", "--dump-dom",
                              "file://" + copy], capture_output=True, text=True, timeout=120)
    finally:
        os.remove(copy)
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, "the probe did not report:\n" + run.stderr[-2000:]
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def equations_in(page):
    """How many equations the chapter's Markdown holds, counted from its text, not from the page."""
    with open(os.path.join(DOCS, page + ".md")) as f:
        text = docs_build.CODE_SPAN.sub("", docs_build.FENCE.sub("", f.read()))
    return len(docs_build.DISPLAY.findall(text)) + len(docs_build.INLINE_MATH.findall(docs_build.DISPLAY.sub("", text)))


MATH_PROBE = """
await document.fonts.ready;
const prose = document.getElementById('prose').cloneNode(true);
prose.querySelectorAll('annotation, .katex-mathml, pre, code, #probe').forEach(e => e.remove());
const faces = [...document.fonts].filter(f => f.family.replace(/"/g, '').startsWith('KaTeX'));
report({
  equations: [...document.querySelectorAll('#prose .katex')].filter(e => !e.closest('#toc')).length,
  errors: document.querySelectorAll('.katex-error').length,
  leftover: (prose.textContent.match(/\\\\[a-zA-Z]*|\\$/g) || []).slice(0, 10),
  loaded: faces.filter(f => f.status === 'loaded').map(f => f.family.replace(/"/g, '') + ' ' + f.style + ' ' + f.weight),
  failed: faces.filter(f => f.status === 'error').map(f => f.family),
  wide: [...document.querySelectorAll('.katex-display')].filter(d => d.scrollWidth > d.clientWidth + 1)
        .map(d => d.querySelector('annotation').textContent.slice(0, 60)),
  blackboard: document.fonts.check('16px KaTeX_AMS'), calligraphic: document.fonts.check('16px KaTeX_Caligraphic'),
  main: document.querySelector('.katex') ? getComputedStyle(document.querySelector('.katex')).fontFamily : '',
});
"""


@pytest.mark.parametrize("page", chapters())
def test_every_equation_is_typeset_with_katex_fonts_from_the_file_system(page):
    result = run_in_page(page, MATH_PROBE)
    expected = equations_in(page)
    assert result["equations"] == expected, (page, result["equations"], expected)
    assert result["errors"] == 0
    assert result["leftover"] == [], f"TeX left untypeset in {page}: {result['leftover']}"
    assert result["wide"] == [], f"displayed equations wider than the text at 1400 pixels: {result['wide']}"
    if expected == 0:  # a chapter of tables and prose: no maths, no KaTeX fonts to load
        return
    assert result["failed"] == [], f"fonts that did not load: {result['failed']}"
    families = {f.split()[0] for f in result["loaded"]}
    assert {"KaTeX_Main", "KaTeX_Math"} <= families, result["loaded"]
    assert result["main"].startswith("KaTeX_Main"), result["main"]
    if page == "walkthrough":  # blackboard E and calligraphic N come from their own fonts
        assert {"KaTeX_AMS", "KaTeX_Caligraphic"} <= families and result["blackboard"] and result["calligraphic"]


def test_a_broken_equation_fails_the_probe(tmp_path):
    # The probe is not blind: the same check on a page with raw TeX and a KaTeX error in it reports both.
    page = "walkthrough"
    with open(os.path.join(DOCS, page + ".html")) as f:
        html = f.read()
    broken = html.replace("<p>", r'<p>Raw: \frac{a}{b}, $x$. <span class="katex-error">x</span> ', 1)
    name = "broken.tmp-page"
    with open(os.path.join(DOCS, name + ".html"), "w") as f:
        f.write(broken)
    try:
        result = run_in_page(name, MATH_PROBE)
    finally:
        os.remove(os.path.join(DOCS, name + ".html"))
    assert result["errors"] == 1 and "\\frac" in result["leftover"] and "$" in result["leftover"]


FOLLOW_PROBE = """
const unit = [nearest([[0, 10], [20, 30]], 15), nearest([[0, 10], [20, 30]], 25), nearest([[0, 10], [20, 30]], -5),
              nearest([[0, 10], [20, 30]], 99), nearest([[0, 100], [40, 50]], 45), nearest([], 3)];
const shown = () => {
  const lit = [...document.querySelectorAll('#code .lit')];
  return lit.length ? [lit[0].closest('.file').dataset.file, lit[0].id, lit[lit.length - 1].id] : null;
};
const at = y => { scrollTo(0, y - innerHeight / 3); follow(); return shown(); };
const all = [...document.querySelectorAll('#prose a.code')];
const top = a => a.getBoundingClientRect().top + scrollY;
const links = all.map(a => ({
  section: a.closest('section').querySelector('h2') ? a.closest('section').querySelector('h2').id : '',
  text: a.textContent, top: top(a),
  want: [a.dataset.file, a.dataset.file + '-L' + a.dataset.first, a.dataset.file + '-L' + a.dataset.last],
}));
for (const l of links) {
  if (l.top < innerHeight / 3) { l.got = null; continue; }  // above the reading line even at the very top
  l.got = at(l.top + 2);
  l.gotSpan = spans()[now];
}
const codeBox = document.getElementById('code').getBoundingClientRect(), wide = [];
document.querySelectorAll('#code pre, #prose pre').forEach(p => { if (p.scrollWidth > p.clientWidth + 1) wide.push(p.textContent.slice(0, 60)); });
report({unit, links, cut: wide, sections: [...document.querySelectorAll('#prose h2')].map(h => h.id),
        toc: [...document.querySelectorAll('#toc a')].map(a => a.getAttribute('href'))});
"""


@pytest.fixture(scope="module")
def walkthrough_follow():
    return run_in_page("walkthrough", FOLLOW_PROBE)


def test_the_choice_of_the_nearest_link_is_a_small_function_of_the_scroll_position(walkthrough_follow):
    # Inside a span the distance is 0; between two it is the nearer edge; of two at the same distance, the first.
    assert walkthrough_follow["unit"] == [0, 1, 0, 1, 0, -1]


def test_the_pane_follows_every_link_as_the_text_scrolls(walkthrough_follow):
    checked = 0
    for link in walkthrough_follow["links"]:
        if link["got"] is None:
            continue
        checked += 1
        # The link under the reading line is shown, or another whose text also covers that line: two links in
        # one line of text, or a link broken across two lines.
        assert link["got"] == link["want"] or link["gotSpan"][0] <= link["top"] + 2 <= link["gotSpan"][1], link
    assert checked >= len(walkthrough_follow["links"]) - 3


def test_scrolling_through_section_6_moves_the_pane_from_p_sample_loop_to_p_sample_and_back(walkthrough_follow):
    section6 = [link for link in walkthrough_follow["links"] if link["section"].startswith("6-")]
    shown = [link["got"] for link in section6]
    loop = next(link["want"] for link in section6 if link["text"].startswith("p_sample_loop in"))
    step = next(link["want"] for link in section6 if link["text"].startswith("p_sample in"))
    assert loop in shown and step in shown and shown.index(loop) < shown.index(step)
    # and back up: scrolling up passes the same links in reverse order, so p_sample_loop's link comes back
    assert shown[::-1].index(loop) > shown[::-1].index(step)


def test_every_section_that_names_code_shows_it_and_sections_have_anchors_and_contents(walkthrough_follow):
    result = walkthrough_follow
    assert result["toc"] == ["#" + s for s in result["sections"]] and len(result["sections"]) >= 12
    named = {link["section"] for link in result["links"]}
    shown = {link["section"] for link in result["links"] if link["got"] == link["want"]}
    assert named == shown, named - shown
    assert result["cut"] == [], "code cut off at the right edge: " + repr(result["cut"])


def test_a_wrong_nearest_link_fails_the_check():
    # The same probe with nearest() broken on purpose (always the first link) fails the follow check.
    result = run_in_page("walkthrough", "nearest = (spans, y) => spans.length ? 0 : -1;\n" + FOLLOW_PROBE)
    wrong = [link for link in result["links"] if link["got"] and link["got"] != link["want"]
             and not link["gotSpan"][0] <= link["top"] + 2 <= link["gotSpan"][1]]
    assert len(wrong) > 10
