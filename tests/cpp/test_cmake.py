"""CMake's first words to a newcomer: a Python without torch gets a message that names that
Python and the flags that point CMake at the right one, not only "Could not find Torch"."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_python_without_torch_is_named_with_the_way_out(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    base = Path(sys._base_executable)
    if subprocess.run([str(base), "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{base} has torch: no Python without it to show CMake")
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython3_EXECUTABLE={base}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    message = " ".join(result.stderr.split())
    assert result.returncode != 0
    assert f"CMake found the Python {base}, which cannot import torch" in message
    assert "-DPython3_EXECUTABLE=" in message and "-DCMAKE_PREFIX_PATH=" in message
