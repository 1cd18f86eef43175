"""
Static checks of the library's code: the linter (ruff.toml: lines within 120 columns, no unused imports or names), and
that model.py imports nothing from the project but dyrate.
"""
import ast
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def test_ruff_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_model_imports_only_torch_safetensors_the_standard_library_and_dyrate():
    tree = ast.parse(open(os.path.join(HERE, "model.py")).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    project = {name[:-3] for name in os.listdir(HERE) if name.endswith(".py")} | {"shapes", "tools", "tests"}
    assert imported & project == {"dyrate"}
    assert imported - project <= {"contextlib", "copy", "json", "os", "dataclasses", "torch", "safetensors"}, imported


# ----------------------------------------------------------------------------------------------------------------------
# device hygiene: a tensor made on the CPU inside a CUDA path is the first CUDA bug a user would meet

FACTORIES = {"arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "rand", "randn", "randint", "randperm",
             "linspace", "eye", "Generator"}
DEVICE_FREE = {  # (file, function): why a factory there needs no device=
    ("model.py", "__init__"),  # module parameters are made like nn.Linear's, on the default device (meta when loading)
}
# the library: the core at the root and the tools beside it (shapes/ is left out: the toy trains on the CPU only)
LIBRARY = [name for name in sorted(os.listdir(HERE)) if name.endswith(".py") and not name.startswith("test_")
           and name != "conftest.py"]
LIBRARY += [os.path.join("tools", name) for name in sorted(os.listdir(os.path.join(HERE, "tools")))
            if name.endswith(".py")]


def factories_without_a_device(source, filename):
    """(line, function, call) of each torch.<factory>(...) call that names no device (a device= keyword, or the
    Generator's positional device), outside DEVICE_FREE. *_like and .new_* calls take their tensor's device."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            call = child if isinstance(child, ast.Call) else None
            if call and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) \
                    and call.func.value.id == "torch" and call.func.attr in FACTORIES:
                named = any(k.arg == "device" for k in call.keywords) or (call.func.attr == "Generator" and call.args)
                if not named and (filename, function) not in DEVICE_FREE:
                    found.append((call.lineno, function, ast.unparse(call)))
            visit(child, name)
    visit(ast.parse(source), None)
    return found


def test_every_tensor_factory_in_the_library_names_its_device():
    bad = {name: factories_without_a_device(open(os.path.join(HERE, name)).read(), name) for name in LIBRARY}
    assert not any(bad.values()), {name: calls for name, calls in bad.items() if calls}


def test_the_device_check_finds_a_planted_arange():
    source = open(os.path.join(HERE, "model.py")).read()
    head = "    def rope(self, positions, dtype):\n"
    planted = source.replace(head, head + "        positions = torch.arange(len(positions))\n")
    assert planted != source
    assert [(f, c) for _, f, c in factories_without_a_device(planted, "model.py")] == [
        ("rope", "torch.arange(len(positions))")]
