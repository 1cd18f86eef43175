"""
Static checks of the library's code: the linter (ruff.toml: lines within 120 columns, no unused imports or names), and
that model.py imports nothing from the project but dyrate.
"""
import ast
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_ruff_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_model_imports_only_torch_safetensors_the_standard_library_and_dyrate():
    tree = ast.parse(open(os.path.join(HERE, "model.py")).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    project = {name[:-3] for name in os.listdir(HERE) if name.endswith(".py")} | {"shapes"}
    assert imported & project == {"dyrate"}
    assert imported - project <= {"json", "os", "dataclasses", "torch", "safetensors"}, imported
