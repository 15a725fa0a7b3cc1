// Build-time only, called by docs/build.py: typesets every equation of a page with KaTeX (pinned in
// docs/package.json). Reads a JSON list of [tex, display] pairs on stdin, writes a JSON list of HTML strings.
// A TeX error stops the build: katex.renderToString throws on any command it does not know.
const katex = require("katex");
let input = "";
process.stdin.on("data", chunk => input += chunk);
process.stdin.on("end", () => {
  const out = JSON.parse(input).map(([tex, display]) =>
    katex.renderToString(tex, {displayMode: display, throwOnError: true, strict: "error", output: "htmlAndMathml"}));
  process.stdout.write(JSON.stringify(out));
});
