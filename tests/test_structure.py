"""The layout's promises (README, train_gpt.py's docstring): the core never reaches back into itself through
its sibling modules, no module imports another in a cycle (not even inside a function), only the CLIs import
train_gpt.py, every script is safe to import, and the docstring and README name every module."""

import ast
import subprocess
import sys

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
        "benchmark", "checkpoint", "cli", "guards", "hellaswag_eval", "fused_loss", "hf_gpt2", "parallelize", "plots", "preflight", "sampling", "shards", "tokenizer",
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


def test_every_flags_resume_rule_is_the_readmes():
    """README's resume table, row by row, against the resume= each TrainConfig field declares."""
    import re

    from cli import MAY_CHANGE, NOT_RESTORED, RESTORED, flag_name, flags_with_rule
    from train_gpt import TrainConfig

    readme = (ROOT / "README.md").read_text()
    rows = {
        MAY_CHANGE: r"\| restored, and may be given anew[^|]*\| (.*) \|",
        RESTORED: r"\| restored, and a different value is refused[^|]*\| (.*) \|",
        NOT_RESTORED: r"\| never restored[^|]*\| (.*) \|",
    }
    hidden = {"inject_nan_steps"}  # a testing hook, not in --help
    for rule, pattern in rows.items():
        listed = re.findall(r"`(--[a-z0-9-]+)`", re.search(pattern, readme).group(1))
        assert sorted(listed) == sorted(flag_name(n) for n in flags_with_rule(TrainConfig, rule) - hidden), rule
