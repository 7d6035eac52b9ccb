"""Turn benchmark results into a markdown comparison and a throughput plot.

    python -m benchmarks.report RESULTS.json [--out DIR]

``RESULTS.json`` is pytest-benchmark's ``--benchmark-json`` output or a ``benchmarks.json`` this
module saved. A timed ``pytest benchmarks/ --benchmark-only`` run calls ``save`` itself.
Each row gives the median time, the achieved FLOP rate and the time relative to ours (the
moe_kernels backend ``auto`` picks on that device) for the same operation and shape.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def seconds(result: dict) -> float:
    """A result's median time: by CUDA events where they were recorded, else pytest-benchmark's."""
    info = result.get("extra_info", {})
    return info["cuda_median_ms"] / 1e3 if info.get("cuda_median_ms") else result["stats"]["median"]


def _rows(results: list[dict]) -> dict[tuple, list[dict]]:
    rows = defaultdict(list)
    for result in results:
        info = result.get("extra_info", {})
        if "group" in info:
            rows[(info["group"], info["op"], info["case"])].append(result)
    return rows


def markdown(results: list[dict]) -> str:
    """One table per group: FLOPs per call, median ms, FLOP rate (and images/s for the model
    group), time relative to ours and, on CUDA, peak memory, per variant."""
    lines = []
    by_group = defaultdict(list)
    for key, entries in _rows(results).items():
        by_group[key[0]].append((key, entries))
    for group, rows in by_group.items():
        device = rows[0][1][0]["extra_info"]["device"]
        lines += [
            f"### {group} ({device})",
            "",
            "| op | case | variant | dtype | GFLOP | median ms | rate | time / ours | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (_, op, case), entries in rows:
            ours = [e for e in entries if e["extra_info"].get("ours")]
            base = seconds(ours[0]) if ours else None
            for e in sorted(entries, key=seconds):
                info, median = e["extra_info"], seconds(e)
                rate = ""
                if info.get("tflops"):
                    rate = f"{info['tflops']:.1f} TFLOP/s"
                elif info.get("gflops"):
                    rate = f"{info['gflops']:.1f} GFLOP/s"
                if info.get("images"):
                    rate += f", {info['images'] / median:.1f} img/s"
                ratio = f"{median / base:.2f}" if base else ""
                variant = info["variant"] + (" (interpreter)" if info.get("interpreted") else "")
                gflop = f"{info['flops'] / 1e9:.3g}" if info.get("flops") else ""
                peak = f"{info['peak_mb']:.0f}" if info.get("peak_mb") else ""
                lines.append(
                    f"| {op} | {case} | {variant} | {info['dtype']} | {gflop} | {median * 1e3:.3f} | {rate} | {ratio} | {peak} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path | None:
    """Layer throughput (tokens/s) against tokens, one line per variant and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for result in results:
        info = result.get("extra_info", {})
        if info.get("group") == "layer" and info.get("tokens") and not info.get("interpreted"):
            series[(info["variant"], info["op"])].append((info["tokens"], info["tokens"] / seconds(result)))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, op in zip(axes, ("fwd", "fwd+bwd")):
        for (variant, this_op), points in sorted(series.items()):
            if this_op == op:
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per layer call")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"MoE FFN layer, {op}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    device = next(r["extra_info"]["device"] for r in results if "device" in r.get("extra_info", {}))
    fig.suptitle(device)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(results: list[dict], device_name: str, out: Path | None = None) -> list[Path]:
    """Write ``benchmarks.json``, ``report.md`` and ``layer_throughput.png`` for ``device_name``."""
    out = out or RESULTS_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_")
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(
        json.dumps({"device": device_name, "benchmarks": results}, indent=1, default=str)
    )
    (out / "report.md").write_text(markdown(results))
    paths = [out / "benchmarks.json", out / "report.md"]
    png = plot(results, out / "layer_throughput.png")
    return paths + ([png] if png else [])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", help="pytest-benchmark JSON (--benchmark-json) or a saved benchmarks.json")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/<device>)")
    args = p.parse_args(argv)
    data = json.loads(Path(args.results).read_text())
    results = data["benchmarks"] if isinstance(data, dict) else data
    device = next((r["extra_info"]["device"] for r in results if "device" in r.get("extra_info", {})), "unknown")
    paths = save(results, device, Path(args.out) if args.out else None)
    print(markdown(results))
    print("saved: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
