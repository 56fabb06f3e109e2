"""`megatron-delta plot-routing RUN_DIR [--output PNG]`: how a trained model routes over depth.

Reads RUN_DIR/metrics.jsonl (written by `megatron-delta train` every logging interval) and draws
one PNG with two panels:
  left   heatmap of the latest routing statistics: one row per sublayer, one column per source
         (0 = token embeddings, then the earlier block / sublayer outputs in order), colour and
         number = mean routing weight;
  right  routing sharpness over training: mean max routing weight per sublayer (thin lines) and
         its mean over sublayers (thick line); 1.0 = each token picks one source. Sublayers with a
         single source (weight 1 by construction, e.g. the first block of delta_block) are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np


def read_records(metrics_path: str, key: str) -> dict[int, dict]:
    """{step: record} of the metrics.jsonl records that have a (non-empty) `key`, in step order;
    a step logged twice (a run resumed from an earlier checkpoint) keeps its later line."""
    records = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get(key) not in (None, {}):
                records[record["step"]] = record
    return dict(sorted(records.items()))


def read_routing_history(metrics_path: str) -> dict[int, dict]:
    """{step: routing summary} from a metrics.jsonl."""
    return {step: record["routing"] for step, record in read_records(metrics_path, "routing").items()}


def routing_matrix(routing: dict) -> tuple[list[str], np.ndarray]:
    """(sublayer labels, [sublayer, source] mean routing weights; NaN past a row's sources)."""
    labels = list(routing)
    num_sources = max(stats["num_sources"] for stats in routing.values())
    weights = np.full((len(labels), num_sources), np.nan)
    for row, label in enumerate(labels):
        mean_weight = routing[label]["mean_weight"]
        weights[row, : len(mean_weight)] = mean_weight
    return labels, weights


def draw_heatmap(ax, labels: list[str], weights: np.ndarray, title: str):
    """One row per sublayer, one column per source, colour (and number) = mean routing weight."""
    num_sources = weights.shape[1]
    image = ax.imshow(np.ma.masked_invalid(weights), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    if len(labels) * num_sources <= 400:  # numbers stay legible
        for (row, col), value in np.ndenumerate(weights):
            if not math.isnan(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(num_sources), ["emb"] + [str(i) for i in range(1, num_sources)], fontsize=8)
    ax.set_xlabel("routing source\n(emb = token embeddings, then earlier outputs in depth order)", fontsize=8)
    ax.set_title(title, fontsize=10)
    return image


def plot_routing(history: dict[int, dict], output: str, title: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = routing_figure(history, title)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def routing_figure(history: dict[int, dict], title: str = ""):
    """The two panels as a matplotlib Figure (heatmap image: the latest mean weights, NaN where a
    sublayer has fewer sources; lines: max weight per routed sublayer, then their mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last_step, last = max(history.items())
    labels, weights = routing_matrix(last)  # "layer_00.attention", "layer_00.mlp", ... in depth order
    num_sources = weights.shape[1]

    height = max(4.0, 0.28 * len(labels) + 1.5)
    fig, (heat_ax, curve_ax) = plt.subplots(
        1, 2, figsize=(7 + 0.45 * num_sources, height), gridspec_kw={"width_ratios": [max(num_sources, 3), 5]}
    )
    image = draw_heatmap(heat_ax, labels, weights, f"mean routing weight\nat step {last_step}")
    fig.colorbar(image, ax=heat_ax, fraction=0.05, pad=0.02)

    steps = list(history)
    routed = [label for label in labels if last[label]["num_sources"] > 1]
    curves = np.array([[history[step].get(label, {}).get("max_weight", np.nan) for step in steps]
                       for label in routed]).reshape(len(routed), len(steps))
    for curve in curves:
        curve_ax.plot(steps, curve, color="tab:blue", alpha=0.25, linewidth=0.8)
    if routed:
        curve_ax.plot(steps, np.nanmean(curves, axis=0), color="tab:blue", linewidth=2.5, label="mean over sublayers")
        curve_ax.plot([], [], color="tab:blue", alpha=0.25, label="one sublayer")
        curve_ax.legend(loc="lower right", fontsize=8)
    curve_ax.set_ylim(0.0, 1.02)
    curve_ax.set_xlabel("training step")
    curve_ax.set_ylabel("mean max routing weight (sharpness)")
    curve_ax.set_title(f"routing sharpness over training\n({len(routed)} sublayers with 2+ sources)", fontsize=10)
    curve_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="megatron-delta plot-routing",
        description="Heatmap of routing weights (sublayers x sources) and sharpness over training "
        "from a run directory's metrics.jsonl.",
    )
    parser.add_argument("run_dir", help="logging.dir of a `megatron-delta train` run")
    parser.add_argument("--output", help="PNG to write (default: RUN_DIR/routing.png)")
    args = parser.parse_args(argv)
    metrics = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        print(f"plot-routing: error: {metrics} does not exist; give the logging.dir of a training run",
              file=sys.stderr)
        return 2
    history = read_routing_history(metrics)
    if not history:
        print(f"plot-routing: error: {metrics} has no routing statistics (a standard-variant run, or no "
              f"logging step yet)", file=sys.stderr)
        return 2
    output = args.output or os.path.join(args.run_dir, "routing.png")
    plot_routing(history, output, title=os.path.basename(os.path.normpath(args.run_dir)))
    print(f"wrote {output}: {len(history)} logged steps, {len(history[max(history)])} sublayers")
    return 0


if __name__ == "__main__":  # through the CLI, which checks the megatron-core release first
    from megatron_delta import cli

    sys.exit(cli.main(["plot-routing", *sys.argv[1:]]))
