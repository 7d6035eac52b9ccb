"""The report prefers CUDA-event times where a CUDA run recorded them, and shows peak memory."""

from benchmarks import report


def _result(variant, host_median_s, cuda_median_ms=None, peak_mb=None, ours=False):
    info = dict(
        group="layer",
        op="fwd",
        case="T=4096",
        variant=variant,
        dtype="bfloat16",
        device="GPU",
        flops=int(2e12),
        ours=ours,
    )
    if cuda_median_ms is not None:
        info.update(cuda_median_ms=cuda_median_ms, peak_mb=peak_mb)
    return {"stats": {"median": host_median_s}, "extra_info": info}


def test_cuda_event_times_and_peak_memory_are_reported():
    # The host timer saw 10 ms for both (a sync-bound measurement); the CUDA events tell them apart.
    results = [
        _result("triton", 0.010, cuda_median_ms=2.0, peak_mb=512, ours=True),
        _result("torch", 0.010, cuda_median_ms=4.0, peak_mb=1024),
    ]
    assert report.seconds(results[0]) == 0.002
    text = report.markdown(results)
    rows = [line for line in text.splitlines() if line.startswith("| fwd")]
    assert rows[0].split(" | ")[2:] == ["triton", "bfloat16", "2e+03", "2.000", "", "1.00", "512 |"]
    assert rows[1].split(" | ")[2:] == ["torch", "bfloat16", "2e+03", "4.000", "", "2.00", "1024 |"]


def test_cpu_results_keep_pytest_benchmarks_median():
    results = [_result("torch", 0.5, ours=True)]
    assert report.seconds(results[0]) == 0.5
    assert "| 500.000 |" in report.markdown(results)
