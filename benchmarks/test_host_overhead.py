"""The host-overhead script runs (one call per round: its numbers mean nothing here)."""

from benchmarks import host_overhead


def test_host_overhead_times_both_paths():
    results = host_overhead.measure(calls=1, rounds=1)
    assert set(results) == {"eval forward", "train fwd+bwd"}
    assert all(row["skipped"] > 0 and row["dispatcher"] > 0 for row in results.values())
