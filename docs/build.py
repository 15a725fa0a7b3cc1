"""Build every chapter of docs/ from its source and the tags in the project's code (standard library only).

Each docs/NAME.src.md becomes docs/NAME.md. The sources name code by tag, never by line number:
  - a tag is a comment that starts with a bracket: `# [eq. 4] ...` or `x = ...  # [alg. 2, line 1]`;
  - `def NAME` or `class NAME` names a top-level function or class;
  - a tag lives in ddpm.py unless a file comes first: `evaluate.py: def decoder_nll`, `files.py: def save_grid`;
  - `@code TAG` alone on a line becomes a link to the lines and the snippet itself;
  - `{{TAG}}` inside a sentence becomes a link to the lines.
Every tag must appear exactly once in its file, and every tag written in a project file must be used by
some chapter, so that no equation in the code goes unexplained.

    python docs/build.py            # write every chapter
    python docs/build.py --check    # exit 1 if one is stale, or a tag is missing, doubled or unused
"""

import re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TAG = re.compile(r"#\s*\[([a-z][^\]]*)\]")
BLOCK, INLINE = re.compile(r"^@code (.+)$", re.M), re.compile(r"\{\{(.+?)\}\}")
FILE = re.compile(r"^([\w/]+\.py):\s*(.+)$")


def indent(line):
    return len(line) - len(line.lstrip())


def statement_end(lines, first):
    """The last line (0-based) of the statement that starts on line `first`, its indented body included:
    an `if` with its branch, a call with its continuation lines. A line inside a bracket goes on."""
    depth, j = 0, first
    while True:
        code = re.sub(r"#.*", "", re.sub(r"(\"[^\"]*\"|'[^']*')", "", lines[j]))
        depth += code.count("(") + code.count("[") + code.count("{") - code.count(")") - code.count("]") - code.count("}")
        if depth <= 0 and not code.rstrip().endswith("\\"):
            break
        j += 1
    if lines[first].split("#")[0].rstrip().endswith(":"):  # a compound statement: its body is indented deeper
        for k in range(j + 1, len(lines)):
            if lines[k].strip() and indent(lines[k]) <= indent(lines[first]):
                break
            if lines[k].strip():
                j = k
    return j


def locate(lines, name, where="ddpm.py"):
    """(first, last) 0-based line indices of a tag's snippet or a top-level def/class; errors if absent or doubled.

    A tag at the end of a line covers its statement (a compound one with its body). A tag on a comment line of
    its own covers the statements under it, up to a blank line, another comment, the end of the block, or a
    statement with a tag of its own."""
    if name.startswith(("def ", "class ")):
        hits = [i for i, l in enumerate(lines) if re.match(rf"{name}\b", l)]
    else:
        hits = [i for i, l in enumerate(lines) for m in TAG.finditer(l) if m.group(1) == name]
    if len(hits) != 1:
        raise SystemExit(f"docs/build.py: `{name}` appears {len(hits)} times in {where}; it must appear exactly once")
    first = last = hits[0]
    if name.startswith(("def ", "class ")):
        while first > 0 and lines[first - 1].startswith("@"):  # decorators belong to the function
            first -= 1
        for j in range(hits[0] + 1, len(lines)):
            if lines[j].strip() and indent(lines[j]) == 0:
                break
            if lines[j].strip():
                last = j
    elif lines[first].lstrip().startswith("#"):
        j = first + 1
        while j < len(lines) and lines[j].lstrip().startswith("#") and not TAG.search(lines[j]):
            j += 1  # the tag's comment goes on
        while j < len(lines) and lines[j].strip() and not lines[j].lstrip().startswith("#") \
                and indent(lines[j]) == indent(lines[first]):
            end = statement_end(lines, j)
            if any(TAG.search(line) for line in lines[j:end + 1]):
                break  # a statement with a tag of its own is that tag's
            last, j = end, end + 1
    else:
        last = statement_end(lines, first)
    return first, last


class Code:
    """The project's Python files, read once, and which of their tags the chapters used."""

    def __init__(self):
        self.files = {p.name: p.read_text().splitlines() for p in sorted(ROOT.glob("*.py"))}
        self.used = set()

    def find(self, ref):
        """ref is `TAG` (in ddpm.py) or `FILE.py: TAG` -> (file, tag, first, last)."""
        m = FILE.match(ref.strip())
        file, name = (m.group(1), m.group(2).strip()) if m else ("ddpm.py", ref.strip())
        if file not in self.files:
            raise SystemExit(f"docs/build.py: `{ref}` names {file}, which is not a file of the project")
        self.used.add((file, name))
        return (file, name, *locate(self.files[file], name, file))

    def link(self, ref):
        """A Markdown link to the lines of ref, as GitHub renders them: ../ddpm.py#L120-L131."""
        file, name, first, last = self.find(ref)
        where = f"L{first + 1}" if first == last else f"L{first + 1}-L{last + 1}"
        label = name.split()[1] if name.startswith(("def ", "class ")) else f"[{name}]"
        return f"[`{label}` in `{file}` {where}](../{file}#{where})", file, first, last

    def unused(self):
        tags = {(f, m.group(1)) for f, lines in self.files.items() for l in lines for m in TAG.finditer(l)}
        return sorted(tags - self.used)


def build_chapter(src, code):
    def block(m):
        ref, file, first, last = code.link(m.group(1))
        chunk = code.files[file][first:last + 1]
        cut = min(indent(l) for l in chunk if l.strip())
        return ref + "\n\n```python\n" + "\n".join(l[cut:] for l in chunk) + "\n```"

    body = BLOCK.sub(block, INLINE.sub(lambda m: code.link(m.group(1))[0], src.read_text()))
    header = (f"<!-- Generated by docs/build.py from docs/{src.name} and the project's code. "
              f"Edit those, then rebuild. -->\n\n")
    return header + body


def build():
    """{output path: text} for every chapter; fails on a tag that is missing, doubled or never used."""
    code = Code()
    out = {src.with_name(src.name.replace(".src.md", ".md")): build_chapter(src, code)
           for src in sorted(DOCS.glob("*.src.md"))}
    if code.unused():
        raise SystemExit("docs/build.py: tags that no chapter uses: " + ", ".join(f"{f}: {t}" for f, t in code.unused()))
    return out


# ----------------------------------------------------------------------------------------------
# The side-by-side reader: each chapter also as one HTML page, prose and equations on the left, the code
# they name on the right. Everything is done here, at build time: KaTeX typesets the equations (node, with
# the version pinned in docs/package.json; the page ships KaTeX's style sheet and fonts in docs/katex/),
# Pygments highlights the code, so the page needs only a browser, no server, no network, no script for maths.
# Build-time tools: pip install -r requirements-docs.txt && npm ci --prefix docs

FENCE, CODE_SPAN = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S), re.compile(r"`[^`\n]+`")
DISPLAY, INLINE_MATH = re.compile(r"\$\$(.+?)\$\$", re.S), re.compile(r"\$([^$\n]+?)\$")
LINK = re.compile(r'href="\.\./([\w/]+\.py)#L(\d+)(?:-L(\d+))?"')
KATEX = DOCS / "node_modules" / "katex" / "dist"

STYLE = """
body { margin: 0; font: 17px/1.6 Georgia, 'Times New Roman', serif; color: #222; }
#prose { padding: 1em 2em 80vh; box-sizing: border-box; max-width: 52em; }
body.split #prose { width: 50%; }
#code { position: fixed; top: 0; right: 0; width: 50%; height: 100vh; overflow: auto; background: #fafafa;
        border-left: 1px solid #ddd; font: 12.5px/1.45 Menlo, Consolas, 'DejaVu Sans Mono', monospace; }
#code .name { position: sticky; top: 0; background: #eee; padding: 0.3em 1em; font-weight: bold; z-index: 1; }
#code pre { margin: 0; padding: 0.5em 1em 0.5em 0; white-space: pre-wrap; overflow-wrap: anywhere; }
#code span[id] { display: block; padding-left: 4.2em; }
#code .ln { display: inline-block; width: 3.2em; margin-left: -4.2em; padding-right: 1em; text-align: right;
            color: #999; user-select: none; }
#code span.lit { background: #fff3b0; }
#prose pre { background: #f4f4f4; padding: 0.6em; font-size: 13px; white-space: pre-wrap; overflow-wrap: anywhere; }
#prose code { font-size: 0.88em; overflow-wrap: anywhere; }
#prose a.code { background: #eef4ff; }
#prose a.code.now { background: #fff3b0; }
#prose h2 a.anchor { visibility: hidden; margin-left: 0.3em; color: #aaa; text-decoration: none; }
#prose h2:hover a.anchor { visibility: visible; }
#toc { font-size: 0.95em; border: 1px solid #ddd; background: #fcfcfc; padding: 0.5em 1em; }
#toc ol { margin: 0.3em 0; padding-left: 1.5em; }
.katex-display { overflow-x: auto; overflow-y: hidden; padding: 0.2em 0; }
.katex { font-size: 1.08em; }
.table { overflow-x: auto; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; }
img { max-width: 100%; }
@media (max-width: 1200px) { body.split #prose { width: 58%; } #code { width: 42%; } }
"""

SCRIPT = """
// Show the lines first..last of file in the pane, highlighted, scrolled so that they begin near its top.
const lit = [];
function show(file, first, last, smooth) {
  document.querySelectorAll('#code .file').forEach(f => f.hidden = f.dataset.file !== file);
  lit.splice(0).forEach(e => e.classList.remove('lit'));
  for (let n = first; n <= last; n++) {
    const line = document.getElementById(file + '-L' + n);
    if (line) { line.classList.add('lit'); lit.push(line); }
  }
  const top = document.getElementById(file + '-L' + first);
  if (top) document.getElementById('code').scrollTo({top: top.offsetTop - 80, behavior: smooth ? 'smooth' : 'auto'});
}

// The pane follows the reader. Each link to code covers [top, bottom] of the page: its own line, or, for a
// link that heads a snippet, the snippet too. The pane shows the link nearest the reading line, a third of
// the way down the window; inside a link's span the distance is 0, and of two at the same distance the first wins.
function nearest(spans, y) {
  let best = -1, bestDistance = Infinity;
  spans.forEach(([top, bottom], i) => {
    const distance = y < top ? top - y : y > bottom ? y - bottom : 0;
    if (distance < bestDistance) { best = i; bestDistance = distance; }
  });
  return best;
}
const links = [...document.querySelectorAll('#prose a.code')];
function spans() {
  return links.map(a => {
    const box = a.getBoundingClientRect(), p = a.closest('p'), next = p && p.nextElementSibling;
    const heads = next && next.tagName === 'PRE' && p.textContent.trim() === a.textContent.trim();
    return [box.top + scrollY, (heads ? next.getBoundingClientRect().bottom : box.bottom) + scrollY];
  });
}
let now = -1;
function follow() {
  const i = nearest(spans(), scrollY + innerHeight / 3);
  if (i < 0 || i === now) return;
  if (now >= 0) links[now].classList.remove('now');
  now = i;
  const a = links[i];
  a.classList.add('now');
  show(a.dataset.file, +a.dataset.first, +a.dataset.last, false);
}
links.forEach(a => a.addEventListener('click', e => {
  e.preventDefault(); show(a.dataset.file, +a.dataset.first, +a.dataset.last, true);
}));
let queued = false;
addEventListener('scroll', () => {
  if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; follow(); }); }
});
addEventListener('load', follow);
follow();
"""


def typeset(equations):
    """[(tex, display)] -> [KaTeX's HTML], in one call of node; a TeX error stops the build."""
    import json, subprocess
    run = subprocess.run(["node", str(DOCS / "katex_render.js")], input=json.dumps(equations), text=True,
                         capture_output=True, cwd=DOCS)
    if run.returncode:
        raise SystemExit("docs/build.py: KaTeX could not typeset an equation:\n" + run.stderr[-2000:])
    return json.loads(run.stdout)


def slug(heading):
    """`## 3. The posterior $q(x_{t-1} \\mid x_t, x_0)$` -> 3-the-posterior-q-x-t-1-x-t-x-0"""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\\[a-zA-Z]+", "", heading).lower()).strip("-")


def html_page(title, markdown_text, code, pages):
    """One chapter as a side-by-side HTML page; code: the Code whose files the chapter links to;
    pages: the names of the chapters that have an HTML page, so that links between chapters stay in HTML."""
    import html
    import markdown
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    kept, equations = [], []

    def keep(text):  # a placeholder that Markdown leaves alone, put back after it ran
        kept.append(text)
        return f"KEPT{len(kept) - 1:05d}X"

    def maths(tex, display):  # typeset below, all of the page's equations in one call
        equations.append((tex.strip(), display))
        return keep(f"MATH{len(equations) - 1:05d}X")

    def fence(m):
        lexer = PythonLexer() if m.group(1) == "python" else None
        body = highlight(m.group(2), lexer, HtmlFormatter(nowrap=True)) if lexer else html.escape(m.group(2))
        return keep(f"<pre><code>{body}</code></pre>")
    text = FENCE.sub(fence, markdown_text)
    text = CODE_SPAN.sub(lambda m: keep(f"<code>{html.escape(m.group(0)[1:-1])}</code>"), text)
    text = DISPLAY.sub(lambda m: maths(m.group(1), True), text)
    text = INLINE_MATH.sub(lambda m: maths(m.group(1), False), text)
    typeset_ = typeset(equations) if equations else []
    sections, toc = re.split(r"(?m)^(?=## )", text), []
    body = "".join(f"<section>\n{markdown.markdown(s, extensions=['tables'])}\n</section>\n" for s in sections)
    body = body.replace("<table>", '<div class="table"><table>').replace("</table>", "</table></div>")
    while "KEPT" in body:
        body = re.sub(r"KEPT(\d{5})X", lambda m: kept[int(m.group(1))], body)
    body = re.sub(r"MATH(\d{5})X", lambda m: typeset_[int(m.group(1))], body)
    body = re.sub(r'href="(\w+)\.md(#[\w-]*)?"', lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"'
                  if m.group(1) in pages else m.group(0), body)
    slugs = iter(slug(h) for h in re.findall(r"(?m)^## (.*)$", FENCE.sub("", markdown_text)))

    def heading(m):  # every section gets an anchor, named from its heading's source, and a line in the contents
        toc.append((next(slugs), m.group(1)))
        return f'<h2 id="{toc[-1][0]}">{m.group(1)}<a class="anchor" href="#{toc[-1][0]}">#</a></h2>'
    body = re.sub(r"<h2>(.*?)</h2>", heading, body)
    contents = "".join(f'<li><a href="#{s}">{h}</a></li>' for s, h in toc)
    if len(toc) > 2:
        body = body.replace("</h1>\n", f'</h1>\n<nav id="toc"><b>Contents</b><ol>{contents}</ol></nav>\n', 1)
    linked = []

    def link(m):
        file, first = m.group(1), m.group(2)
        linked.append(file) if file not in linked else None
        return f'href="#{file}-L{first}" class="code" data-file="{file}" data-first="{first}" data-last="{m.group(3) or first}"'
    body = LINK.sub(link, body)
    panes = "".join(  # Pygments wraps line n of file f in <span id="f-n">; the id becomes f-Ln, as the links say
        f'<div class="file" data-file="{f}"><div class="name">{f}</div>'
        + re.sub(r'<span id="LINE-(\d+)">', lambda m: f'<span id="{f}-L{m.group(1)}"><span class="ln">{m.group(1)}</span>',
                 highlight("\n".join(code.files[f]) + "\n", PythonLexer(), HtmlFormatter(linespans="LINE")))
        + "</div>" for f in linked)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="stylesheet" href="katex/katex.min.css">\n'
            f"<style>{STYLE}{HtmlFormatter().get_style_defs('pre')}</style></head>\n"
            f'<body{" class=split" if linked else ""}>\n'
            f'<!-- Generated by docs/build.py. Edit the .src.md and the code, then rebuild. -->\n'
            f'<div id="prose">\n{body}</div>\n' + (f'<div id="code">{panes}</div>\n<script>{SCRIPT}</script>\n' if linked else "")
            + "</body></html>\n")


def katex_files():
    """{docs/katex/...: bytes}: KaTeX's style sheet naming only its woff2 fonts, those fonts, and its licence (MIT)."""
    css = re.sub(r",url\([^)]*\.(?:woff|ttf)\) format\(\"(?:woff|truetype)\"\)", "", (KATEX / "katex.min.css").read_text())
    files = {DOCS / "katex" / "katex.min.css": css.encode(), DOCS / "katex" / "LICENSE": (KATEX.parent / "LICENSE").read_bytes()}
    files.update({DOCS / "katex" / "fonts" / f.name: f.read_bytes() for f in sorted((KATEX / "fonts").glob("*.woff2"))})
    return files


def build_html(chapters):
    """{docs/NAME.html: page} for the chapters and KaTeX's files, or {} when the build-time tools are missing."""
    import shutil
    try:
        import markdown, pygments  # noqa: F401
    except ImportError as e:
        print(f"note: the HTML pages were not built ({e}); pip install -r requirements-docs.txt", file=sys.stderr)
        return {}
    if not shutil.which("node") or not KATEX.is_dir():
        print("note: the HTML pages were not built (KaTeX is missing); npm ci --prefix docs", file=sys.stderr)
        return {}
    code, pages = Code(), {path.stem for path in chapters}
    out = {path.with_suffix(".html"): html_page(text.split("\n", 3)[2].lstrip("# "), text, code, pages)
           for path, text in chapters.items()}
    out.update(katex_files())
    return out


def main():
    chapters = build()
    chapters.update(build_html(chapters))
    for path, text in chapters.items():
        data = text if isinstance(text, bytes) else text.encode()
        if "--check" in sys.argv:
            if not path.exists() or path.read_bytes() != data:
                raise SystemExit(f"docs/build.py: {path.relative_to(ROOT)} is stale; run python docs/build.py and commit it")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    print(("up to date: " if "--check" in sys.argv else "wrote ") + ", ".join(str(p.relative_to(ROOT)) for p in chapters
                                                                                 if p.suffix != ".woff2"))


if __name__ == "__main__":
    main()
