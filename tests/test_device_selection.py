"""``NOFLASH_TEST_DEVICE``: which device the engine tests run on, and a clear error for a bad value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.support.device import DEVICE, ENV_VAR, resolve_test_device


def test_default_is_cpu_and_names_are_case_insensitive():
    assert resolve_test_device("") == torch.device("cpu")
    assert resolve_test_device(" CPU ") == torch.device("cpu")
    assert DEVICE == resolve_test_device(os.environ.get(ENV_VAR, ""))


@pytest.mark.parametrize("value", ["meta", "gpu", "cuda:0", "rocm"])
def test_unknown_value_names_the_variable_and_the_choices(value):
    with pytest.raises(ValueError, match=rf"{ENV_VAR}='{value}' is not a test device\. Use one of cpu, cuda, xpu, mps"):
        resolve_test_device(value)


@pytest.mark.parametrize("kind", ["cuda", "xpu", "mps"])
def test_missing_device_says_so(kind):
    try:
        device = resolve_test_device(kind)
    except ValueError as exc:
        assert f"{ENV_VAR}={kind} but this torch" in str(exc) and "sees no" in str(exc)
    else:
        assert device.type == kind  # this machine has one


def test_a_bad_value_stops_pytest_before_any_test_runs(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, ENV_VAR: "tpu", "PYTEST_ADDOPTS": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "tests/test_layout.py"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert f"{ENV_VAR}='tpu' is not a test device" in proc.stderr
