"""The breadth test: every MoE family of the installed transformers is served by moe_kernels and
equal to eager, or falls back with a warning and is equal through transformers' grouped_mm;
none is ever silently wrong. ``hf_families.py`` checks each experts module alone, ``hf_models.py``
each family's whole tiny model (logits and every parameter's gradient)."""

import os

import pytest

pytest.importorskip("transformers", minversion="5", reason="the hf extra (transformers >= 5) is not installed")

from tests.integrations.hf_families import check, discover, table  # noqa: E402
from tests.integrations.hf_models import families, sweep  # noqa: E402

# Families served with transformers 5.25 when this was written (all but MuseSpark, whose
# post-expert norm is outside the grouped-GEMM pipeline): fewer is a regression.
MIN_SERVED_FAMILIES = 71


def test_every_family_is_served_or_falls_back_loudly():
    results = [check(family, cls) for family, cls in discover()]
    families = {r.family for r in results}
    assert len(families) >= 70, "the sweep lost families: discovery is broken"
    mismatches = [f"{r.family} {r.experts}: {r.detail}" for r in results if r.status == "mismatch"]
    assert not mismatches, "\n".join(mismatches)
    served = families - {r.family for r in results if r.status != "served"}
    assert len(served) >= MIN_SERVED_FAMILIES, table(results)
    assert all(r.detail for r in results if r.status == "fallback"), "a fallback without its reason"


def test_every_whole_model_matches_eager():
    results = sweep(families())
    assert len(results) >= 70, "the sweep lost families: discovery is broken"
    differs = [f"{r.family}: {r.detail}" for r in results if r.status == "differs"]
    assert not differs, "\n".join(differs)
    equal = [r.family for r in results if r.status == "equal"]
    others = "\n".join(f"{r.family}: {r.status}: {r.detail}" for r in results if r.status != "equal")
    assert len(equal) >= MIN_SERVED_FAMILIES, others
    assert all(r.detail for r in results if r.status == "fallback"), "a fallback without its reason"


# One family per activation kind the sweep finds (and lfm2's SiLU read from its module, beam's
# SwiGLU in fp32): the whole models again, their experts through the Triton kernels.
TRITON_FAMILIES = ("mixtral", "lfm2_moe", "beam", "deepseek_v4", "gpt_oss", "inkling2", "gemma4", "nemotron_h")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels on CPU tensors")
def test_whole_models_through_the_triton_kernels():
    results = sweep(list(TRITON_FAMILIES), backend="triton")
    assert all(r.status == "equal" for r in results), "\n".join(f"{r.family}: {r.status}: {r.detail}" for r in results)
