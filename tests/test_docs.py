"""docs/api.md against the code: every public name is documented, and every documented signature is the
code's own (names, order, defaults)."""
import inspect
import os
import re

import pytest

import mobilenet
import quant
import rotconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"rotconv": rotconv, "mobilenet": mobilenet, "quant": quant}


def _sections() -> dict[str, str]:
    text = open(os.path.join(ROOT, "docs", "api.md")).read()
    parts = re.split(r"^## (\w+)", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _default(value) -> str:
    return value.__name__ if callable(value) and hasattr(value, "__name__") else repr(value)


def signature_text(obj) -> str | None:
    """``(a, b=1, *, c=None, **rest)`` as written in the docs: names and defaults, no annotations."""
    try:
        signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    except (TypeError, ValueError):
        return None
    parts, keyword_only = [], False
    for parameter in signature.parameters.values():
        if parameter.name == "self":
            continue
        if parameter.kind is parameter.VAR_POSITIONAL:
            parts.append(f"*{parameter.name}")
            keyword_only = True
        elif parameter.kind is parameter.VAR_KEYWORD:
            parts.append(f"**{parameter.name}")
        else:
            if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only:
                parts.append("*")
                keyword_only = True
            parts.append(parameter.name if parameter.default is parameter.empty
                         else f"{parameter.name}={_default(parameter.default)}")
    return "(" + ", ".join(parts) + ")"


def _public(package):
    return [(name, getattr(package, name)) for name in package.__all__]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_public_name_is_documented_with_its_signature(package):
    section = _sections()[package]
    for name, obj in _public(PACKAGES[package]):
        assert re.search(rf"`{re.escape(name)}[`(]", section), f"{package}.{name} is not in docs/api.md"
        documented = re.findall(rf"`{re.escape(name)}(\([^`]*\))`", section)
        signature = signature_text(obj) if callable(obj) else None
        exception = inspect.isclass(obj) and issubclass(obj, BaseException)
        if documented and signature is not None:
            assert signature in documented, f"{package}.{name}: docs say {documented}, code says {signature}"
        elif callable(obj) and not exception and signature != "(*args, **kwargs)":  # shown with their signature
            assert documented, f"{package}.{name}: documented without its signature {signature}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_documented_names_exist(package):
    section = _sections()[package]
    table_names = re.findall(r"^\| `(\w+)[`(]", section, flags=re.MULTILINE)
    for name in table_names:
        assert hasattr(PACKAGES[package], name), f"docs/api.md documents {package}.{name}, which does not exist"


def test_signature_text_sees_a_changed_default():
    def example(a, b=1, *, c=None, **rest):
        return a

    assert signature_text(example) == "(a, b=1, *, c=None, **rest)"
    assert signature_text(lambda a, log=print: a) == "(a, log=print)"


def test_readme_usage_example_runs_and_is_equivariant(capsys):
    # The README's 10-line example, executed as written: its printed 90-degree error must be float32
    # rounding (an exact symmetry; 1e-5 leaves room for summation order), and its INT8 model must exist.
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert float(capsys.readouterr().out.strip()) < 1e-5
    assert isinstance(namespace["int8"], quant.Int8Model)
