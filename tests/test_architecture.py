"""The house plan: the stages are folders, and imports point one way between them.

A module may import its own stage and the stages above it in `STAGES` (igpt_ds/__init__.py's map), never one
below; evaluation never loads training; every module belongs to a stage (a new module outside every folder and
outside the few top-level ones fails here); every stage's `__init__` says what it holds."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_support import REPO, env

PACKAGE = REPO / "igpt_ds"
# Lowest first. The top-level modules are stages of their own: the foundation first, the entry points last.
STAGES = [
    {"config", "atomic", "host_sync"},
    "distributed",
    "data",
    "models",
    "checkpoint",
    "eval",
    "plan",
    "train",
    {"cli", "__main__"},
]


def stage_of(module: str) -> int:
    """The stage of dotted module `module` (below igpt_ds), or raise: a module outside every stage."""
    head = module.split(".")[0]
    for i, stage in enumerate(STAGES):
        if (isinstance(stage, set) and module in stage) or (isinstance(stage, str) and head == stage):
            return i
    raise AssertionError(f"igpt_ds.{module} is in no stage: put it in a stage's folder (igpt_ds/__init__.py's map)")


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
        if p != PACKAGE / "__init__.py"
    }


def imported(path: Path) -> set[str]:
    """igpt_ds modules `path` imports anywhere in it (module level or inside functions), dotted below igpt_ds."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: a relative import; name igpt_ds.<stage>... so the stage rule can see it")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("igpt_ds"):
            base = node.module.removeprefix("igpt_ds").lstrip(".")
            for alias in node.names:  # `from igpt_ds.checkpoint import weights` imports a module of the folder
                candidate = f"{base}.{alias.name}" if base else alias.name
                out.add(candidate if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("igpt_ds.") for a in node.names if a.name.startswith("igpt_ds.")}
    return {m for m in out if m}


def test_every_module_is_in_a_stage_and_imports_only_its_own_or_earlier_stages():
    found = modules()
    assert {stage_of(m) for m in found} == set(range(len(STAGES)))  # raises for a module outside every stage
    upward = sorted((m, dep) for m, p in found.items() for dep in imported(p) if stage_of(dep) > stage_of(m))
    assert upward == []


def test_the_rule_is_enforced():
    """The check fails for what it forbids: a stage importing a later one, a module outside every stage."""
    assert stage_of("eval.probe") < stage_of("train.loop") and stage_of("models.igpt") < stage_of("checkpoint.weights")
    with pytest.raises(AssertionError, match="igpt_ds.helpers is in no stage"):
        stage_of("helpers")


def test_every_stage_says_what_it_holds_and_may_import():
    for stage in (s for s in STAGES if isinstance(s, str)):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"igpt_ds/{stage}/__init__.py lacks the docstring of its stage"


EVALUATION = sorted(m for m in modules() if m.startswith("eval."))


@pytest.mark.parametrize("module", EVALUATION)
def test_evaluation_does_not_import_the_trainer(module):
    code = f"import sys, igpt_ds.{module}; print(sorted(m for m in sys.modules if m.startswith('igpt_ds.train')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"igpt_ds.{module} imports igpt_ds.train (transitively)"
