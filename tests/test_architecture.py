"""The package layers (docs/architecture.md): rotconv at the bottom, mobilenet and quant each on rotconv alone,
benchmarks on top; and no module reaches into another module's private names."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = {"rotconv": {"rotconv"}, "mobilenet": {"rotconv", "mobilenet"}, "quant": {"rotconv", "quant"},
           "benchmarks": {"rotconv", "mobilenet", "quant", "benchmarks"}}


def _modules():
    for package in ALLOWED:
        for path in sorted(glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)):
            yield package, os.path.relpath(path, ROOT), ast.parse(open(path).read())


def _imports(own: str, tree: ast.AST):
    """(imported module, names) for every import of module ``own`` (dotted; a package's is ``pkg.__init__``),
    relative ones resolved as Python does."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = own.split(".")[:-node.level]  # "pkg.__init__" drops "__init__" at level 1: the package
                module = ".".join(base + ([module] if module else []))
            yield module, [alias.name for alias in node.names]


@pytest.mark.parametrize("package, path, tree", list(_modules()),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_layers_only_look_down_and_private_names_stay_home(package, path, tree):
    own = path[:-3].replace(os.sep, ".")
    for module, names in _imports(own, tree):
        top = module.split(".")[0]
        if top in ALLOWED:
            assert top in ALLOWED[package], f"{path} imports {module}: {package} may use only {ALLOWED[package]}"
            private = [name for name in names if name.startswith("_")]
            assert not private or module == own, f"{path} imports private {private} from {module}"
    # attribute access to another module's private name: alias._name where alias is an imported project module
    aliases = {alias.asname or alias.name.split(".")[-1] for node in ast.walk(tree)
               if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
               if (isinstance(node, ast.Import) and alias.name.split(".")[0] in ALLOWED)
               or (isinstance(node, ast.ImportFrom) and ((node.module or "").split(".")[0] in ALLOWED or node.level))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            raise AssertionError(f"{path}:{node.lineno} uses {node.value.id}.{node.attr}, a private name")
