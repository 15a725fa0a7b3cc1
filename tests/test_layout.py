"""The shape of the project: imports go one way, ddpm.py stays within its line budget, and the functions of
Algorithms 1 and 2 read without opening another file."""

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
    assert graph["checks"] == set()  # the bottom: it imports nothing of ours
    assert graph["files"] == {"checks"}
    assert graph["launch"] == {"checks", "files"}
    assert graph["images"] <= {"checks", "files"}
    assert graph["solvers"] == set()  # a companion of ddpm.py that reads alone
    assert graph["ddpm"] == {"images", "checks", "files", "launch", "solvers"}
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
    for name in ("ddpm.py", "solvers.py"):
        with open(os.path.join(HERE, name)) as f:
            lines = f.read().splitlines()
        too_long = [i + 1 for i, line in enumerate(lines) if len(line) > 110]
        assert not too_long, f"{name}: lines over 110 characters: {too_long}"  # the reader's pane wraps them
    assert len(open(os.path.join(HERE, "ddpm.py")).readlines()) <= 700  # DEVELOPERS.md: about 650, never over 700


# The functions of Algorithms 1 and 2 and of the samplers: each reads as the algorithm, in ddpm.py itself.
ALGORITHM = ["get_batch", "random_batch", "q_sample", "q_posterior", "loss_fn", "ema_update", "lr_at", "setup",
             "train_step", "predict_x0", "p_sample", "p_sample_loop", "timesteps", "respace", "ddim_sample",
             "guided", "at", "linear_beta", "cosine_beta", "timestep_embedding", "Schedule", "UNet", "ResBlock",
             "Attention"]


def test_algorithms_1_and_2_call_nothing_of_ours_outside_ddpm_py():
    tree = ast.parse(open(os.path.join(HERE, "ddpm.py")).read())
    defs = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert set(ALGORITHM) <= set(defs), set(ALGORITHM) - set(defs)
    ours = set(MODULES) - {"ddpm"}
    for name in ALGORITHM:
        for node in ast.walk(defs[name]):  # any use of a module of ours: files.X, images.X, solvers.X
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert node.value.id not in ours, f"{name} uses {node.value.id}.{node.attr}"
            if isinstance(node, ast.Name):
                assert node.id not in ours, f"{name} uses the module {node.id}"
    # and the algorithm's own lines are there to see: the draws, the loss, backward(), Adam, the step, the EMA
    step = ast.get_source_segment(open(os.path.join(HERE, "ddpm.py")).read(), defs["train_step"])
    for line in ("torch.randint(0, s.sched.T", "torch.randn(", "loss_fn(", ".backward()", "clip_grad_norm_",
                 "s.optimizer.step()", "ema_update("):
        assert line in step, line
    assert "torch.optim.Adam(" in ast.get_source_segment(open(os.path.join(HERE, "ddpm.py")).read(), defs["setup"])


def test_every_config_field_has_its_help_text():
    # The flags of `train` are built from Config's fields, their help from launch.HELP: the two must agree.
    import dataclasses
    import ddpm, launch
    assert {f.name for f in dataclasses.fields(ddpm.Config)} == set(launch.HELP)
