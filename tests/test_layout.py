"""The shape of the project: imports go one way, and ddpm.py stays within its line budget."""

import ast, glob, os

from helpers import HERE

MODULES = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(HERE, "*.py"))}


def project_imports(path):
    """The project's modules that the file at path imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_imports_go_one_way():
    graph = {m: project_imports(p) - {m} for m, p in MODULES.items()}
    assert graph["plumbing"] == set()  # the bottom: it imports nothing of ours
    assert graph["images"] == {"plumbing"}
    assert graph["ddpm"] == {"images", "plumbing"}
    for m in MODULES:  # no circle: following imports from m never comes back to m
        seen, todo = set(), list(graph[m])
        while todo:
            n = todo.pop()
            assert n != m, f"{m} imports itself through {sorted(seen)}"
            if n not in seen:
                seen.add(n)
                todo += graph[n]
    for m, p in MODULES.items():  # and no import hidden from the reader
        assert "sys.modules" not in open(p).read(), m


def test_ddpm_py_stays_within_its_budget():
    with open(os.path.join(HERE, "ddpm.py")) as f:
        assert len(f.readlines()) <= 650  # DEVELOPERS.md: about 600 lines, never more than 650
