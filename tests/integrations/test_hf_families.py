"""The breadth test: every MoE family of the installed transformers is served by moe_kernels and
equal to eager, or falls back with a warning and is equal through transformers' grouped_mm;
none is ever silently wrong (``hf_families.py`` discovers and checks them)."""

import pytest

pytest.importorskip("transformers", minversion="5", reason="the hf extra (transformers >= 5) is not installed")

from tests.integrations.hf_families import check, discover, table  # noqa: E402

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
