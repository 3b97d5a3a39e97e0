"""The layout's promises (README, train_gpt.py's docstring): the core never reaches back into itself through
its sibling modules, no module imports another in a cycle (not even inside a function), only the CLIs import
train_gpt.py, every script is safe to import, and the docstring and README name every module."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
CLIS = {"train_gpt", "fineweb", "hellaswag", "sample"}


def project_imports(module: str) -> set[str]:
    """Every project module that `module` imports, at module level or inside any function."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_the_expected_modules_are_there():
    assert set(MODULES) == CLIS | {
        "benchmark", "checkpoint", "cli", "guards", "hellaswag_eval", "hf_gpt2", "parallelize", "plots",
    }  # fmt: skip


def test_no_import_cycle_even_inside_functions():
    graph = {m: project_imports(m) for m in MODULES}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    assert [m for m in MODULES if reaches(m, m, {m})] == []


def test_only_the_clis_hellaswag_and_sample_import_train_gpt():
    assert sorted(m for m in MODULES if "train_gpt" in project_imports(m)) == ["hellaswag", "sample"]


def test_cli_layer_and_data_prep_stay_torch_free():
    """fineweb.py's spawned tokenizer workers import it (and so cli.py) again: no torch there."""
    code = "import sys, fineweb, cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_script_is_safe_to_import():
    """Importing a script runs nothing: no output, no file, no parsing of sys.argv."""
    code = "import sys; sys.argv = ['x', '--bogus']; " + "; ".join(f"import {m}" for m in MODULES)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_docstring_and_readme_name_every_module():
    doc = ast.get_docstring(ast.parse((ROOT / "train_gpt.py").read_text()))
    readme = (ROOT / "README.md").read_text()
    for m in MODULES:
        if m != "train_gpt":
            assert f"{m}.py" in doc, m
        assert f"`{m}.py`" in readme, m
