"""The docs against the code: docs/api.md documents every public name with the code's own signature (names,
order, defaults); every call of a public function or class shown in README.md and docs/*.md binds to the
code's signature (no stale argument names or counts)."""
import ast
import glob
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
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert float(capsys.readouterr().out.strip()) < 1e-5
    assert isinstance(namespace["int8"], quant.Int8Model)


def _calls(text: str):
    """(snippet, package, name, call node) for every ``package.name(...)`` (or a bare public ``Name(...)``)
    that parses as a call, in code blocks and inline code."""
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+\))`", text)
    for snippet in blocks + inline:
        try:
            tree = ast.parse(snippet.strip())
        except SyntaxError:  # a signature written with * or annotations, a fragment: checked elsewhere or prose
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in PACKAGES:
                yield snippet, func.value.id, func.attr, node
            elif isinstance(func, ast.Name) and snippet in inline:
                owners = [package for package, module in PACKAGES.items() if func.id in module.__all__]
                if owners:
                    yield snippet, owners[0], func.id, node


#: builders whose keyword arguments are a class's (torchvision's pattern): calls are checked against the class
BUILT_BY = {("mobilenet", "mobilenet_v2"): mobilenet.MobileNetV2}


def _placeholder_call(node: ast.Call):
    args = [object() for argument in node.args if not isinstance(argument, ast.Starred)]
    kwargs = {keyword.arg: object() for keyword in node.keywords if keyword.arg is not None}
    return args, kwargs


@pytest.mark.parametrize("document", ["README.md"] + sorted(os.path.relpath(p, ROOT)
                                                          for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))))
def test_every_call_shown_in_the_docs_fits_the_code(document):
    text = open(os.path.join(ROOT, document)).read()
    checked = 0
    for snippet, package, name, node in _calls(text):
        assert hasattr(PACKAGES[package], name), f"{document}: {package}.{name} does not exist ({snippet[:80]})"
        target = BUILT_BY.get((package, name), getattr(PACKAGES[package], name))
        if not callable(target):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        args, kwargs = _placeholder_call(node)
        if (package, name) in BUILT_BY:
            kwargs.pop("weights", None)
        try:
            signature.bind_partial(*args, **kwargs)  # prose may leave out required arguments
        except TypeError as error:
            raise AssertionError(f"{document}: {package}.{name}{signature} cannot be called as shown: "
                                 f"{ast.unparse(node)} ({error})") from None
        checked += 1
    if document == "README.md":
        assert checked >= 15  # the README's examples are covered


def test_the_call_check_sees_a_stale_argument():
    for stale in (
        "```python\nmodel = mobilenet.mobilenet_v2(2, 12, 1.0, 95, 'relu6', 0.2, 'max', 1, 'channel', None, None, "
        "False, 3)\n```",  # one positional argument more than MobileNetV2 takes
        "`mobilenet.mobilenet_v2(groups=12)`",
    ):
        (_, _, _, node), = list(_calls(stale))
        with pytest.raises(TypeError):
            inspect.signature(mobilenet.MobileNetV2).bind_partial(*_placeholder_call(node)[0],
                                                                   **_placeholder_call(node)[1])


def test_python_versions_agree_between_readme_and_setup_cfg():
    # the package's classifiers name exactly the Python releases the README says the suite passes on, from
    # setup.cfg's floor up without a gap
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    classified = sorted(int(minor) for minor in re.findall(r"Programming Language :: Python :: 3\.(\d+)",
                                                            config["metadata"]["classifiers"]))
    floor = int(re.fullmatch(r">=3\.(\d+)", config["options"]["python_requires"].strip()).group(1))
    readme = open(os.path.join(ROOT, "README.md")).read()
    listed = re.search(r"the\s+suite passes on ((?:3\.\d+,? (?:and )?)+)with every extra", readme)
    assert listed, "README: the sentence naming the Python versions the suite passes on"
    tested = sorted(int(minor) for minor in re.findall(r"3\.(\d+)", listed.group(1)))
    assert classified == tested
    assert classified == list(range(floor, classified[-1] + 1))
