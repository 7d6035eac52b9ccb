"""``csrc/moe_ops.cpp`` registers the ops an exported model calls under the schemas the Python
package gives them: a package exported in Python then finds, in ``dit_sample``, ops of the same
signature (checked here without building the C++)."""

import re
from pathlib import Path

import torch

import moe_kernels  # noqa: F401  (registers torch.ops.moe_kernels)

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "moe_ops.cpp"


def _cpp_schemas() -> dict[str, str]:
    text = SOURCE.read_text()
    body = text[text.index("TORCH_LIBRARY(moe_kernels, m)") :]
    schemas = {}
    for call in re.findall(r"m\.def\(((?:\s*\"[^\"]*\")+)\s*\)", body):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        schemas[schema.split("(")[0]] = schema
    return schemas


def test_cpp_ops_have_the_python_schemas():
    schemas = _cpp_schemas()
    assert set(schemas) >= {"topk_gating", "expert_choice_gating", "sort_by_expert", "experts"}
    for name, schema in schemas.items():
        python = str(getattr(torch.ops.moe_kernels, name).default._schema)
        assert python == f"moe_kernels::{schema}", name
