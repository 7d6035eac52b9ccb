"""Test set-up: Triton kernels run through the interpreter on CPU tensors.

The interpreter must be chosen before triton is first imported, hence the top of this file.
Run with TRITON_INTERPRET=0 on a machine with a GPU to test the compiled kernels on it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
