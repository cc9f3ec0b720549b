#!/usr/bin/env python3
"""PNG plots from bench/serving.py result files (matplotlib, Agg backend).

    python bench/plot.py bench/results/*.json --out bench/results/plots/

Writes:
  throughput_vs_concurrency.png  output and total token throughput (and request/s) against
                                 --max-concurrency, one line per label (e.g. per server/model);
                                 runs without a concurrency cap are placed at num_prompts.
  ttft_percentiles.png           mean / p50 / p99 TTFT bars, one group per result file.
  tpot_percentiles.png           the same for TPOT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

# bench/ holds scripts, not modules: keep it off sys.path so a script here (bench/kernels.py)
# cannot shadow a package of the same name (kvserve's kernels, or the one transformers probes).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the backend


def load(paths: list[str]) -> list[dict]:
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if "settings" not in data or "ttft_ms" not in data:
            print(f"skipping {path}: not a bench/serving.py result", file=sys.stderr)
            continue
        data["_path"] = path
        results.append(data)
    return results


def concurrency(r: dict) -> int:
    s = r["settings"]
    return s.get("max_concurrency") or s["num_prompts"]


def label(r: dict) -> str:
    return r["settings"].get("label") or r["settings"].get("model") or "?"


def file_label(r: dict) -> str:
    s = r["settings"]
    parts = [label(r), f"c={s['max_concurrency']}" if s.get("max_concurrency") else "c=all"]
    if s.get("request_rate") not in (None, "inf"):
        parts.append(f"{s['request_rate']} req/s")
    return "\n".join(parts)


def plot_throughput(results: list[dict], out_dir: str) -> str:
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(label(r), []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=concurrency)
        xs = [concurrency(r) for r in rs]
        line, = ax_tok.plot(xs, [r["output_throughput"] for r in rs], "o-",
                            label=f"{name} output")
        ax_tok.plot(xs, [r["total_token_throughput"] for r in rs], "s--",
                    color=line.get_color(), alpha=0.6, label=f"{name} total (in+out)")
        ax_req.plot(xs, [r["request_throughput"] for r in rs], "o-", color=line.get_color(),
                    label=name)
    for ax, ylabel in ((ax_tok, "tokens / s"), (ax_req, "requests / s")):
        xs = sorted({concurrency(r) for r in results})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    s = results[0]["settings"]
    fig.suptitle(f"Throughput vs concurrency ({s['random_input_len']} in -> "
                 f"{s['random_output_len']} out, {s['num_prompts']} requests, {s['endpoint']})"
                 if not s.get("dataset") else "Throughput vs concurrency")
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput_vs_concurrency.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_percentiles(results: list[dict], metric: str, title: str, out_dir: str) -> str:
    results = sorted(results, key=lambda r: (label(r), concurrency(r)))
    stats = ("mean", "median", "p99")
    names = {"mean": "mean", "median": "p50", "p99": "p99"}
    width = 0.8 / len(stats)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(results) + 2), 4.2))
    for k, stat in enumerate(stats):
        xs = [i + (k - (len(stats) - 1) / 2) * width for i in range(len(results))]
        vals = [r[metric].get(stat) or 0.0 for r in results]
        bars = ax.bar(xs, vals, width, label=names[stat])
        ax.bar_label(bars, fmt="%.0f" if max(vals, default=0) >= 100 else "%.1f", fontsize=7)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([file_label(r) for r in results], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"{metric.removesuffix('_ms')}_percentiles.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_plots(paths: list[str], out_dir: str) -> list[str]:
    results = load(paths)
    if not results:
        raise SystemExit("no bench/serving.py results to plot")
    os.makedirs(out_dir, exist_ok=True)
    return [plot_throughput(results, out_dir),
            plot_percentiles(results, "ttft_ms", "Time to first token", out_dir),
            plot_percentiles(results, "tpot_ms", "Time per output token", out_dir)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plots from bench/serving.py JSON results.")
    p.add_argument("results", nargs="+", help="JSON files written by bench/serving.py --output")
    p.add_argument("--out", default="bench/results/plots", help="output directory")
    args = p.parse_args(argv)
    for path in make_plots(args.results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
