"""The oldest supported torch: refused at import with one line naming both versions, and the same floor in
setup.cfg's requirement."""
import configparser
import os
import re
import subprocess
import sys

import pytest

import rotconv
from rotconv.torch_version import check_torch_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("version", ["2.7.0", "2.7.0a0+git1234abc", "2.13.0+cpu", "2.15.0+cu132", "3.0.0"])
def test_supported_versions_pass(version):
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.6.0+cu124", "2.1.2", "1.13.1", "2.06.0"])
def test_older_versions_are_refused_naming_both(version):
    with pytest.raises(ImportError, match=rf"needs torch >= 2\.7, found torch {re.escape(version)}"):
        check_torch_version(version)


def test_an_unreadable_version_is_refused():
    with pytest.raises(ImportError, match="cannot read torch's version 'nightly'"):
        check_torch_version("nightly")


def test_importing_the_packages_with_an_older_torch_fails_with_that_line():
    # torch's own version string stood in for an older install; the packages must not get further than the check
    code = "import torch; torch.__version__ = '2.6.0'; import mobilenet"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        "ImportError: rotconv needs torch >= 2.7, found torch 2.6.0: pip install 'torch>=2.7'")


def test_setup_cfg_requires_the_same_floor():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    (requirement,) = [line for line in config["options"]["install_requires"].split() if line.startswith("torch")]
    floor = re.search(r">=(\d+)\.(\d+)", requirement)
    assert (int(floor.group(1)), int(floor.group(2))) == rotconv.MIN_TORCH
