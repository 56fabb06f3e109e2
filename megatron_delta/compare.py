"""`megatron-delta compare --config CFG --variants standard,attnres_block,attnres_full,delta_block,delta
--seeds 3 [--set section.key=value ...] --output DIR`: the paper's ablation as one command.

Trains every (variant, seed) as a normal `megatron-delta train` run of the same config, with only
`delta.variant` and `training.seed` changed: same shape, schedule, token budget and data order
(`data.seed` is pinned to the config's data seed for every run, so the seed varies the
initialisation and nothing else). Then writes DIR/report.md, DIR/report.json and the figures.

Runs
    DIR/runs/<variant>-seed<seed>/logs (metrics.jsonl, train.log) and .../checkpoints. Every run
    is its own `python -m megatron_delta.train ... --resume auto` process (or one `torchrun
    --standalone --nproc_per_node=N` per run with --nproc-per-node N; the mesh comes from the
    config), one after the other. A run is finished when its metrics.jsonl holds the trainer's
    final record at step training.train_iters: re-running the command skips finished runs and
    resumes an interrupted one from its latest checkpoint. Separate processes rather than calling
    the trainer repeatedly in one: every run gets a fresh process group and fresh Megatron globals
    (mesh, micro-batch calculator, RNG trackers), and the trainer's exit codes and signal handling
    stay as they are. SIGTERM / SIGUSR1 to compare reach the running run as SIGTERM, which saves a
    checkpoint and exits 143; compare then exits 143 too.
    --slurm submits every unfinished run as its own job of slurm/pretrain.sbatch (which requeues and
    resumes it) instead; re-run compare once the jobs have finished to write the report.
    DIR/compare.json keeps the resolved base config: re-running with a different config or --set
    into the same DIR is an error (runs trained differently must not be averaged together).

Report (all numbers from the runs' metrics.jsonl)
    per variant: final validation loss and perplexity (mean and std over seeds), the paired
    difference to `standard` (same seeds) with a Student-t 95% interval, training tokens/s and peak
    memory as ratios to `standard` (measured in this command), parameters and routing parameters,
    routing sharpness per sublayer depth at the last logged step: mean max routing weight (uniform
    = 1/#sources) and entropy / ln(#sources) (1 = uniform, 0 = one source takes everything).
    "Deep" = the deeper half of the 2 x num_layers sublayers (the final routing of the Kimi
    variants is not a sublayer). The statement section turns the intervals into words for the
    paper's two claims: lower validation perplexity than `standard`; sharper deep routing for the
    Delta variants (mean max weight ~0.6) than for Attention Residuals (~0.2) of the same source
    granularity (delta vs attnres_full, delta_block vs attnres_block).

Exit status: 0 report written (or, with --slurm, jobs submitted); 2 bad command line or config;
otherwise the exit status of the run that failed (143: stopped by a signal, re-run to resume).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from megatron_delta.config import VARIANTS
from megatron_delta.data_config import DataError
from megatron_delta.routing_plot import draw_heatmap, read_records, routing_matrix
from megatron_delta.run_config import RunConfigError, build_transformer_config, load_run_config
from megatron_delta.seed_stats import Estimate, estimate, paired_difference

DELTA_VARIANTS = ("delta", "delta_block")
# Each Delta variant's Attention Residuals counterpart routes over sources of the same granularity
# (every earlier sublayer output, or block sums), so their max routing weights compare like for like
# (the report gives each one's uniform baseline 1/#sources).
ATTNRES_COUNTERPART = {"delta": "attnres_full", "delta_block": "attnres_block"}
# compare sets these per run; a --set of them would break the comparison.
RUN_KEYS = ("delta.variant", "training.seed", "logging.dir", "checkpoint.dir", "checkpoint.resume")
SBATCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm", "pretrain.sbatch")
FIGURES = {
    "val_loss": "val_loss.png",
    "sharpness": "sharpness_by_depth.png",
    "heatmaps": "routing_heatmaps.png",
}


class CompareError(ValueError):
    """A bad command line, config or output directory; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# The runs


class Run:
    """One (variant, seed): a `megatron-delta train` run under DIR/runs/<variant>-seed<seed>."""

    def __init__(self, output: str, variant: str, seed: int, data_seed: int):
        self.variant, self.seed = variant, seed
        self.name = f"{variant}-seed{seed}"
        self.dir = os.path.join(output, "runs", self.name)
        self.log_dir = os.path.join(self.dir, "logs")
        self.metrics = os.path.join(self.log_dir, "metrics.jsonl")
        self.overrides = [
            f"delta.variant={variant}", f"training.seed={seed}", f"data.seed={data_seed}",
            f"logging.dir={self.log_dir}", f"checkpoint.dir={os.path.join(self.dir, 'checkpoints')}",
        ]

    def summary(self, train_iters: int) -> dict | None:
        """The trainer's final record (params, peak memory, tokens/s) if the run finished."""
        if not os.path.exists(self.metrics):
            return None
        return read_records(self.metrics, "peak_memory_bytes").get(train_iters)


def parse_seeds(text: str, base_seed: int) -> list[int]:
    """"3" -> three seeds from the config's training.seed on; "1234,7" -> exactly those."""
    try:
        if "," in text:
            seeds = [int(item) for item in text.split(",") if item.strip()]
        else:
            seeds = [base_seed + i for i in range(int(text))]
    except ValueError:
        raise CompareError(f"--seeds {text!r}: give a count (--seeds 3) or a list (--seeds 1234,7)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds {text!r}: need at least one seed and no repeats")
    return seeds


def parse_variants(text: str) -> list[str]:
    variants = [item.strip() for item in text.split(",") if item.strip()]
    for variant in variants:
        if variant not in VARIANTS:
            raise CompareError(f"--variants: {variant!r} is unknown; choose from {', '.join(VARIANTS)}")
    if not variants or len(set(variants)) != len(variants):
        raise CompareError(f"--variants {text!r}: need at least one variant and no repeats")
    return variants


def check_output_dir(output: str, base: dict) -> None:
    """DIR/compare.json pins the base config the runs in DIR were trained with."""
    path = os.path.join(output, "compare.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)["base_config"]
        for section in base:
            for key, value in base[section].items():
                if saved.get(section, {}).get(key) != value:
                    raise CompareError(
                        f"--output {output} holds runs trained with {section}.{key}="
                        f"{saved.get(section, {}).get(key)!r}, this command asks for {value!r}; use the same "
                        f"config and --set values to continue them, or a new --output directory"
                    )
        return
    os.makedirs(output, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"base_config": base}, f, indent=1)
    os.replace(tmp, path)


class SignalForwarder:
    """Passes SIGTERM / SIGUSR1 on to the running run as SIGTERM (the trainer saves and exits 143
    on either; torchrun forwards SIGTERM to its workers but dies of SIGUSR1 by default)."""

    def __init__(self):
        self.child = None
        self.received = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def run_locally(run: Run, config: str, overrides: list[str], nproc: int, forwarder: SignalForwarder) -> int:
    """Train (or resume) one run; its output goes to the console and <run>/logs/train.log."""
    if nproc == 1:
        launcher = [sys.executable, "-m", "megatron_delta.train"]
    else:
        # A large checkpoint saved on SIGTERM may take longer than torchrun's default 30 s grace.
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "--shutdown-timeout=600", "-m", "megatron_delta.train"]
    command = [*launcher, "--config", config, *[f"--set={item}" for item in overrides + run.overrides],
               "--resume", "auto"]
    os.makedirs(run.log_dir, exist_ok=True)
    with open(os.path.join(run.log_dir, "train.log"), "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        forwarder.child = proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            print(f"[{run.name}] {line}", end="", flush=True)
        forwarder.child = None
        return proc.wait()


def submit_to_slurm(run: Run, config: str, overrides: list[str], sbatch_args: list[str], dry_run: bool) -> str:
    """Submit one run as a slurm/pretrain.sbatch job unless a job of it is still queued or running."""
    job_file = os.path.join(run.dir, "slurm_job")
    if os.path.exists(job_file):
        with open(job_file, encoding="utf-8") as f:
            job = f.read().strip()
        state = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job], capture_output=True, text=True).stdout.strip()
        if state:
            return f"job {job} is {state.lower()}"
    command = ["sbatch", "--parsable", f"--job-name=compare-{run.name}", *sbatch_args, SBATCH_SCRIPT, config,
               *[f"--set={item}" for item in overrides + run.overrides]]
    env = {**os.environ, "MEGATRON_DELTA_RUN_DIR": os.path.abspath(run.dir)}
    if dry_run:
        return f"MEGATRON_DELTA_RUN_DIR={env['MEGATRON_DELTA_RUN_DIR']} {shlex.join(command)}"
    os.makedirs(run.dir, exist_ok=True)
    job = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    with open(job_file, "w", encoding="utf-8") as f:
        f.write(job)
    return f"submitted job {job}"


# ---------------------------------------------------------------------------------------------
# What the runs measured


def depth_order(routing: dict) -> list[str]:
    """Router labels in depth order ("layer_01.attention", "layer_01.mlp", ..., "layer_100.attention",
    ...), then "final" (the Kimi variants' routing before the last norm)."""

    def depth(label):
        layer, sublayer = label.split(".")
        return int(layer.removeprefix("layer_")), sublayer != "attention"

    return sorted((label for label in routing if label != "final"), key=depth) + (["final"] if "final" in routing else [])


def read_run(run: Run, train_iters: int) -> dict:
    """One finished run's numbers: final validation loss, curve, speed, memory, routing."""
    val = {step: record["val_loss"] for step, record in read_records(run.metrics, "val_loss").items()}
    summary = run.summary(train_iters)
    routing_history = read_records(run.metrics, "routing")
    routing = {}
    if routing_history:
        last = routing_history[max(routing_history)]["routing"]
        routing = {label: last[label] for label in depth_order(last)}
    return {
        "variant": run.variant,
        "seed": run.seed,
        "val_loss": val[train_iters],
        "val_ppl": math.exp(val[train_iters]),
        "val_curve": {str(step): loss for step, loss in val.items()},
        "train_tokens_per_s": summary.get("train_tokens_per_s"),
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "params": summary["params"],
        "routing_params": summary["routing_params"],
        "routing_step": max(routing_history) if routing_history else None,
        "routing": routing,
    }


def sublayer_sharpness(routing: dict) -> dict:
    """Per layer sublayer (the final routing left out), in depth order: sources, max weight,
    uniform max weight 1/n and entropy / ln n (None for a single source)."""
    labels = [label for label in routing if label != "final"]
    n = [routing[label]["num_sources"] for label in labels]
    return {
        "labels": labels,
        "num_sources": n,
        "max_weight": [routing[label]["max_weight"] for label in labels],
        "uniform_max_weight": [1.0 / k for k in n],
        "entropy_norm": [routing[label]["entropy"] / math.log(k) if k > 1 else None for label, k in zip(labels, n)],
    }


def deep_mean(values: list, num_sources: list[int]) -> float | None:
    """Mean over the deeper half of the sublayers that route over 2+ sources."""
    deep = [v for v, k in list(zip(values, num_sources))[len(values) // 2:] if k > 1]
    return sum(deep) / len(deep) if deep else None


def _mean_std(rows: list[list]) -> tuple[list, list]:
    """Element-wise mean and sample std over seeds (std 0 with one seed); None stays None."""
    means, stds = [], []
    for column in zip(*rows):
        if column[0] is None:
            means.append(None)
            stds.append(None)
            continue
        values = np.array(column, dtype=float)
        means.append(float(values.mean()))
        stds.append(float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return means, stds


def summarize_variant(runs: list[dict], standard: list[dict] | None) -> dict:
    """Seed statistics of one variant (runs in seed order; `standard` in the same order)."""
    out = {
        "seeds": [r["seed"] for r in runs],
        "val_loss": estimate([r["val_loss"] for r in runs]).to_dict(),
        "val_ppl": estimate([r["val_ppl"] for r in runs]).to_dict(),
        "routing_params": runs[0]["routing_params"],
        **cost(runs),
    }
    steps = sorted(set.intersection(*(set(r["val_curve"]) for r in runs)), key=int)
    curve_mean, curve_std = _mean_std([[r["val_curve"][s] for s in steps] for r in runs])
    out["val_curve"] = {"steps": [int(s) for s in steps], "mean": curve_mean, "std": curve_std}
    if standard is not None:
        diff = paired_difference([r["val_loss"] for r in runs], [r["val_loss"] for r in standard])
        out["val_loss_minus_standard"] = diff.to_dict()
        out["val_ppl_ratio_to_standard"] = {
            key: (math.exp(value) if value is not None else None)
            for key, value in (("mean", diff.mean), ("low", diff.low), ("high", diff.high))
        }
        base = cost(standard)
        out["tokens_per_s_ratio"] = (out["train_tokens_per_s"] / base["train_tokens_per_s"]
                                     if out["train_tokens_per_s"] and base["train_tokens_per_s"] else None)
        out["peak_memory_ratio"] = out["peak_memory_bytes"] / base["peak_memory_bytes"]
        out["extra_params"] = out["params"] - base["params"]
    if runs[0]["routing"]:
        per_seed = [sublayer_sharpness(r["routing"]) for r in runs]
        first = per_seed[0]
        max_mean, max_std = _mean_std([s["max_weight"] for s in per_seed])
        ent_mean, ent_std = _mean_std([s["entropy_norm"] for s in per_seed])
        out["sharpness"] = {
            "labels": first["labels"], "num_sources": first["num_sources"],
            "uniform_max_weight": first["uniform_max_weight"],
            "max_weight_mean": max_mean, "max_weight_std": max_std,
            "entropy_norm_mean": ent_mean, "entropy_norm_std": ent_std,
            "deep_max_weight_per_seed": [deep_mean(s["max_weight"], s["num_sources"]) for s in per_seed],
            "deep_entropy_norm_per_seed": [deep_mean(s["entropy_norm"], s["num_sources"]) for s in per_seed],
            "deep_uniform_max_weight": deep_mean(first["uniform_max_weight"], first["num_sources"]),
        }
        for key in ("deep_max_weight", "deep_entropy_norm"):
            per_seed = out["sharpness"][f"{key}_per_seed"]  # None: no deep sublayer has 2+ sources
            out["sharpness"][key] = None if None in per_seed else estimate(per_seed).to_dict()
        labels, weights = zip(*(routing_matrix(r["routing"]) for r in runs))
        mean_weights = np.mean(np.stack(weights), axis=0)  # NaN past a sublayer's sources -> null in JSON
        out["heatmap"] = {"labels": labels[0], "step": runs[0]["routing_step"],
                          "weights": [[None if math.isnan(w) else float(w) for w in row] for row in mean_weights]}
    return out


def cost(runs: list[dict]) -> dict:
    """Parameters, mean peak memory and mean training tokens/s of a variant's runs."""
    return {
        "params": runs[0]["params"],
        "peak_memory_bytes": float(np.mean([r["peak_memory_bytes"] for r in runs])),
        "train_tokens_per_s": (float(np.mean([r["train_tokens_per_s"] for r in runs]))
                               if all(r["train_tokens_per_s"] for r in runs) else None),
    }


# ---------------------------------------------------------------------------------------------
# The paper's claims, in words


def _verdict(diff: Estimate, better_when_negative: bool) -> str:
    if diff.low is None:
        return "cannot resolve"  # one seed: no interval
    if not diff.excludes(0.0):
        return "cannot resolve"
    return "supports" if (diff.high < 0) == better_when_negative else "contradicts"


def _interval(d: dict, digits: int = 3) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.{digits}f} (one seed: no interval)"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def claims(variants: dict) -> dict:
    """Claim 1: a Delta variant reaches lower validation perplexity than standard (paired
    difference of the final validation loss, 95% interval entirely below 0). Claim 2: a Delta
    variant routes sharper in deep sublayers than its Attention Residuals counterpart over the
    same source granularity (paired difference of the deep mean max weight, interval entirely above 0)."""
    deltas = [v for v in variants if v in DELTA_VARIANTS]
    perplexity, sharpness = [], []
    if "standard" not in variants or not deltas:
        perplexity.append({"verdict": "not tested", "text": "needs `standard` and a Delta variant "
                           "(delta or delta_block) in --variants."})
    for v in deltas if "standard" in variants else []:
        d = variants[v]["val_loss_minus_standard"]
        verdict = _verdict(Estimate(**d), better_when_negative=True)
        ratio = variants[v]["val_ppl_ratio_to_standard"]
        perplexity.append({"variant": v, "verdict": verdict, "text": (
            f"`{v}` {verdict} it: validation loss minus standard's {_interval(d)} nats/token over "
            f"{d['n']} paired seed(s) (perplexity x{ratio['mean']:.3f})"
            + ("." if verdict != "cannot resolve" else "; the interval includes 0.")
        )})
    if not deltas:
        sharpness.append({"verdict": "not tested", "text": "needs a Delta variant (delta or delta_block) in --variants."})
    for v in deltas:
        a = ATTNRES_COUNTERPART[v]
        if a not in variants:
            sharpness.append({"variant": v, "against": a, "verdict": "not tested", "text": (
                f"`{v}`: not tested; add `{a}` to --variants (the Attention Residuals variant of the same source granularity).")})
            continue
        mine = variants[v]["sharpness"]["deep_max_weight_per_seed"]
        theirs = variants[a]["sharpness"]["deep_max_weight_per_seed"]
        if None in mine + theirs:
            sharpness.append({"variant": v, "against": a, "verdict": "not tested", "text": (
                f"`{v}` vs `{a}`: no deep sublayer routes over 2+ sources (too few layers or blocks).")})
            continue
        diff = paired_difference(mine, theirs)
        verdict = _verdict(diff, better_when_negative=False)
        sharpness.append({"variant": v, "against": a, "verdict": verdict, "difference": diff.to_dict(), "text": (
            f"`{v}` vs `{a}` {verdict} it: deep mean max weight {np.mean(mine):.3f} vs {np.mean(theirs):.3f} "
            f"(paper: ~0.6 vs ~0.2; uniform {variants[v]['sharpness']['deep_uniform_max_weight']:.3f}), difference "
            f"{_interval(diff.to_dict())} over {diff.n} paired seed(s)"
            + ("." if verdict != "cannot resolve" else "; the interval includes 0.")
        )})
    return {"lower_perplexity": perplexity, "sharper_routing": sharpness}


def _overall(items: list[dict]) -> str:
    verdicts = {item["verdict"] for item in items}
    tested = verdicts - {"not tested"}
    if not tested:
        return "not tested"
    if tested == {"supports"}:
        overall = "supported"
    elif tested == {"contradicts"}:
        overall = "contradicted"
    elif tested == {"cannot resolve"}:
        overall = "not resolved (the intervals include 0)"
    else:
        overall = "mixed: " + ", ".join(sorted(tested))
    return overall + (" (some variants not tested)" if "not tested" in verdicts else "")


# ---------------------------------------------------------------------------------------------
# Figures (drawn from report.json's numbers only, so the JSON holds exactly what is plotted)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(report: dict) -> dict:
    cycle = ["tab:gray", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red", "tab:brown"]
    order = [v for v in VARIANTS if v in report["variants"]]
    return {v: ("black" if v == "standard" else cycle[1 + i % (len(cycle) - 1)]) for i, v in enumerate(order)}


def plot_val_loss(report: dict):
    plt = _pyplot()
    colors = _colors(report)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, summary in report["variants"].items():
        curve = summary["val_curve"]
        steps, mean, std = np.array(curve["steps"]), np.array(curve["mean"]), np.array(curve["std"])
        ax.plot(steps, mean, marker="o", markersize=3, color=colors[variant], label=variant)
        ax.fill_between(steps, mean - std, mean + std, color=colors[variant], alpha=0.2, linewidth=0)
    ax.set_xlabel(f"training step (1 step = {report['setup']['tokens_per_step']:,} tokens)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"validation loss, mean over {len(report['seeds'])} seed(s), band = +-1 std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sharpness(report: dict):
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    colors = _colors(report)
    fig, (max_ax, ent_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    routed = {v: s["sharpness"] for v, s in report["variants"].items() if "sharpness" in s}
    for variant, sharp in routed.items():
        depth = np.arange(1, len(sharp["labels"]) + 1)
        keep = np.array(sharp["num_sources"]) > 1
        for ax, key in ((max_ax, "max_weight"), (ent_ax, "entropy_norm")):
            mean = np.array([np.nan if m is None else m for m in sharp[f"{key}_mean"]], dtype=float)
            std = np.array([np.nan if s is None else s for s in sharp[f"{key}_std"]], dtype=float)
            ax.plot(depth[keep], mean[keep], marker="o", markersize=3, color=colors[variant], label=variant)
            ax.fill_between(depth[keep], (mean - std)[keep], (mean + std)[keep], color=colors[variant], alpha=0.2,
                            linewidth=0)
        max_ax.plot(depth[keep], np.array(sharp["uniform_max_weight"])[keep], linestyle=":", color=colors[variant])
    num_sublayers = max((len(s["labels"]) for s in routed.values()), default=0)
    for ax in (max_ax, ent_ax):
        ax.axvspan(num_sublayers // 2 + 0.5, num_sublayers + 0.5, color="0.9", zorder=0, label="deep half")
        ax.set_xlim(0.5, num_sublayers + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("sublayer depth (1 = first attention; attention and MLP alternate)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    max_ax.set_ylabel("mean max routing weight (dotted: uniform 1/#sources)")
    max_ax.set_title("routing sharpness (1 = each token picks one source)", fontsize=10)
    ent_ax.set_ylabel("routing entropy / ln(#sources)")
    ent_ax.set_title("normalised routing entropy (1 = uniform)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_heatmaps(report: dict):
    plt = _pyplot()
    routed = {v: s["heatmap"] for v, s in report["variants"].items() if "heatmap" in s}
    widths = [max(len(h["weights"][0]), 3) for h in routed.values()]
    rows = max(len(h["labels"]) for h in routed.values())
    fig, axes = plt.subplots(1, len(routed), figsize=(1 + 0.5 * sum(widths) + 2.2 * len(routed), 0.28 * rows + 2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False, layout="constrained")
    for ax, (variant, heat) in zip(axes[0], routed.items()):
        weights = np.array([[np.nan if w is None else w for w in row] for row in heat["weights"]], dtype=float)
        image = draw_heatmap(ax, heat["labels"], weights, f"{variant}\n(mean over seeds, step {heat['step']})")
        ax.set_xlabel("routing source (emb = embeddings)", fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02, label="mean routing weight")
    return fig


def write_figures(report: dict, output: str) -> dict:
    plt = _pyplot()
    written = {}
    drawers = {"val_loss": plot_val_loss, "sharpness": plot_sharpness, "heatmaps": plot_heatmaps}
    for key, draw in drawers.items():
        if key != "val_loss" and not any("sharpness" in s for s in report["variants"].values()):
            continue  # only `standard` in this comparison: no routing to show
        fig = draw(report)
        fig.savefig(os.path.join(output, FIGURES[key]), dpi=100, bbox_inches="tight")
        plt.close(fig)
        written[key] = FIGURES[key]
    return written


# ---------------------------------------------------------------------------------------------
# The report


def build_report(args, variants: list[str], seeds: list[int], runs: list[Run], base) -> dict:
    t, m = base.training, base.model
    measured = {run.name: read_run(run, t.train_iters) for run in runs}
    by_variant = {v: [measured[r.name] for r in runs if r.variant == v] for v in variants}
    standard = by_variant.get("standard")
    report = {
        "command": args.command_line,
        "config": args.config,
        "overrides": args.set,
        "variants": {},
        "seeds": seeds,
        "setup": {
            "data_seed": base.data.seed if base.data.seed is not None else t.seed,
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "seq_length": m.seq_length,
            "num_blocks": base.delta.num_blocks, "train_iters": t.train_iters,
            "global_batch_size": t.global_batch_size, "tokens_per_step": t.global_batch_size * m.seq_length,
            "train_tokens": t.train_iters * t.global_batch_size * m.seq_length,
            "eval_tokens": t.eval_iters * t.global_batch_size * m.seq_length,
            "processes_per_run": args.nproc_per_node,
        },
        "runs": measured,
    }
    for v in variants:
        report["variants"][v] = summarize_variant(by_variant[v], standard)
    report["claims"] = claims(report["variants"])
    return report


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _pm(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f}" + (f" ± {d['std']:.{digits}f}" if d["std"] is not None else "")


def render_markdown(report: dict, figures: dict) -> str:
    s = report["setup"]
    variants = report["variants"]
    has_standard = "standard" in variants
    lines = [
        "# megatron-delta compare",
        "",
        f"`{report['command']}`",
        "",
        f"{len(variants)} variant(s) x {len(report['seeds'])} seed(s) (`training.seed` {', '.join(map(str, report['seeds']))}; "
        f"data order fixed by `data.seed` {s['data_seed']} for every run). Shape: {s['num_layers']} layers, hidden "
        f"{s['hidden_size']}, sequence {s['seq_length']}, {s['num_blocks']} blocks for the block variants. Budget: "
        f"{s['train_iters']} steps x {s['tokens_per_step']:,} tokens = {s['train_tokens']:,} training tokens per run; "
        f"validation on the same {s['eval_tokens']:,} held-out tokens for every run.",
        "",
        "## Results",
        "",
        "Mean ± sample standard deviation over seeds; [95% interval] of the paired difference (same seed, same "
        "data order) from Student's t. Ratios are against `standard` in this comparison. Sharpness is measured "
        "at the last logged step, over the deeper half of the sublayers (uniform routing in parentheses).",
        "",
        "| variant | val loss | val ppl | loss − standard [95%] | ppl ratio | tokens/s ratio | peak memory ratio | "
        "params (routing) | deep mean max weight (uniform) | deep entropy / ln n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, summary in variants.items():
        vs = summary.get("val_loss_minus_standard") if v != "standard" else None
        sharp = summary.get("sharpness")
        lines.append(" | ".join([
            f"| `{v}`", _pm(summary["val_loss"], 4), _pm(summary["val_ppl"], 3),
            _interval(vs, 4) if vs else "-",
            f"{summary['val_ppl_ratio_to_standard']['mean']:.3f}" if vs else "-",
            _fmt(summary.get("tokens_per_s_ratio"), ".2f"), _fmt(summary.get("peak_memory_ratio"), ".2f"),
            f"{summary['params']:,} ({summary['routing_params']:,})",
            f"{_pm(sharp['deep_max_weight'])} ({sharp['deep_uniform_max_weight']:.3f})"
            if sharp and sharp["deep_max_weight"] else "-",
            _pm(sharp["deep_entropy_norm"]) if sharp and sharp["deep_entropy_norm"] else "-",
        ]) + " |")
    lines += ["", "## Statement", ""]
    c = report["claims"]
    lines.append(f"**Claim 1 — lower validation perplexity than standard: {_overall(c['lower_perplexity'])}.**")
    lines += [f"- {item['text']}" for item in c["lower_perplexity"]]
    lines.append("")
    lines.append(f"**Claim 2 — sharper routing in deep layers than Attention Residuals of the same source granularity (mean "
                 f"max weight ~0.6 vs ~0.2): {_overall(c['sharper_routing'])}.**")
    lines += [f"- {item['text']}" for item in c["sharper_routing"]]
    lines += ["", "A claim is *supported* when the 95% interval of the paired difference lies entirely on its side "
              "of 0, *contradicted* when it lies entirely on the other side, and *not resolved* when it includes 0 "
              "(or there is only one seed). These are statements about this run's shape, data and budget only.", ""]
    lines += ["## Figures", ""]
    captions = {
        "val_loss": "Validation loss (nats/token, y) against training step (x) per variant: mean over seeds, "
                    "band = ±1 standard deviation over seeds.",
        "sharpness": "Left: mean max routing weight (y, 1 = one source takes all, dotted = uniform 1/#sources) per "
                     "sublayer depth (x); right: routing entropy / ln(#sources) (y, 1 = uniform); mean ± std over "
                     "seeds at the last logged step; shaded = the deep half. Sublayers with one source are left out.",
        "heatmaps": "Mean routing weight (colour, 0-1) of each sublayer (row) over its sources (column: emb = token "
                    "embeddings, then earlier outputs in depth order), averaged over seeds, per routed variant.",
    }
    for key, name in figures.items():
        lines += [f"![{key}]({name})", "", f"*{captions[key]}*", ""]
    lines += ["## Runs", "", "| run | val loss | val ppl | tokens/s | peak memory (MiB) | params |",
              "|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | {_fmt(r['train_tokens_per_s'], ',.0f')} | "
                     f"{r['peak_memory_bytes'] / 2**20:,.0f} | {r['params']:,} |")
    lines += ["", "Tokens/s: training steps only (no evaluation, checkpointing, first step or routing-statistics "
              "steps); peak memory: max over ranks of allocated CUDA memory, or of the process's resident set on "
              "CPU." + ("" if has_standard else " No `standard` run: ratios and claim 1 need one."), ""]
    return "\n".join(lines)


def write_report(report: dict, output: str) -> None:
    figures = write_figures(report, output)
    report["figures"] = figures
    for name, text in (("report.json", json.dumps(report, indent=1)), ("report.md", render_markdown(report, figures))):
        tmp = os.path.join(output, f"{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(output, name))


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="megatron-delta compare",
        description="Train every (variant, seed) of one config with the same data order, shape, schedule and "
        "token budget, then write report.md, report.json and figures: validation loss with intervals, speed "
        "and memory ratios, routing sharpness, and whether the paper's two claims hold.",
        epilog="Re-running the same command skips finished runs and resumes interrupted ones.",
    )
    parser.add_argument("--config", required=True, help="run config YAML (see examples/configs)")
    parser.add_argument("--variants", default="standard,attnres_block,attnres_full,delta_block,delta",
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: %(default)s)")
    parser.add_argument("--seeds", default="3", help="a count (seeds training.seed, +1, ...) or a comma-separated "
                        "list of training seeds (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value for every run, repeatable")
    parser.add_argument("--output", required=True, help="directory for runs/, report.md, report.json, *.png")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="processes per run: >1 launches each run with torchrun --standalone (default 1)")
    parser.add_argument("--slurm", action="store_true",
                        help="submit unfinished runs as slurm/pretrain.sbatch jobs instead of running them here")
    parser.add_argument("--sbatch-args", default="", help="with --slurm: extra sbatch arguments, e.g. "
                        "'--nodes=1 --gpus-per-node=8 --time=12:00:00'")
    parser.add_argument("--dry-run", action="store_true", help="print what would run or be submitted, start nothing")
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["megatron-delta", "compare", *(argv if argv is not None else sys.argv[1:])])
    return args


def prepare(args):
    """(variants, seeds, runs, base config), every check made before anything starts."""
    if "WORLD_SIZE" in os.environ and not args.dry_run:
        raise CompareError("compare starts its runs itself: run it as one process (not under torchrun/srun); "
                           "use --nproc-per-node N for multi-process runs or --slurm to submit them as jobs")
    if args.nproc_per_node < 1:
        raise CompareError(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
    for item in args.set:
        if item.partition("=")[0].strip() in RUN_KEYS:
            raise CompareError(f"--set {item}: compare sets {item.partition('=')[0]} itself for every run; "
                               f"choose variants with --variants and seeds with --seeds")
    base = load_run_config(args.config, args.set)
    variants = parse_variants(args.variants)
    seeds = parse_seeds(args.seeds, base.training.seed)
    data_seed = base.data.seed if base.data.seed is not None else base.training.seed
    runs = [Run(args.output, v, s, data_seed) for v in variants for s in seeds]
    for run in runs:  # every run's config is checked before the first one starts
        cfg = load_run_config(args.config, args.set + run.overrides)
        if not args.slurm:
            cfg.validate(world_size=args.nproc_per_node)
        build_transformer_config(cfg, on_gpu=False)  # Megatron's own checks
    if args.slurm and not os.path.exists(SBATCH_SCRIPT):
        raise CompareError(f"--slurm needs {SBATCH_SCRIPT} (a source checkout of megatron-delta)")
    base_dict = base.to_dict()
    base_dict["data"]["seed"] = data_seed
    for key in RUN_KEYS:  # what differs between the runs
        section, name = key.split(".")
        del base_dict[section][name]
    if not args.dry_run:
        check_output_dir(args.output, json.loads(json.dumps(base_dict)))
    return variants, seeds, runs, base


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        variants, seeds, runs, base = prepare(args)
    except (CompareError, RunConfigError, DataError, OSError) as e:
        print(f"megatron-delta compare: error: {e}", file=sys.stderr)
        return 2
    train_iters = base.training.train_iters
    todo = [run for run in runs if run.summary(train_iters) is None]
    print(f"megatron-delta compare: {len(runs)} runs ({', '.join(variants)} x seeds {', '.join(map(str, seeds))}), "
          f"{len(runs) - len(todo)} finished, {len(todo)} to train, in {args.output}", flush=True)
    if args.slurm:
        for run in todo:
            print(f"{run.name}: {submit_to_slurm(run, args.config, args.set, shlex.split(args.sbatch_args), args.dry_run)}")
        if todo:
            print("re-run this command when the jobs have finished to write the report")
            return 0
    elif args.dry_run:
        for run in todo:
            print(f"{run.name}: would train in {run.dir}")
        return 0
    forwarder = SignalForwarder()
    for run in todo:
        resuming = os.path.isfile(os.path.join(run.dir, "checkpoints", "latest"))
        print(f"== {run.name}: {'resuming' if resuming else 'training'} ({run.dir})", flush=True)
        start = time.time()
        rc = run_locally(run, args.config, args.set, args.nproc_per_node, forwarder)
        if rc != 0 or forwarder.received or run.summary(train_iters) is None:
            print(f"megatron-delta compare: {run.name} stopped (exit status {rc}); its log is "
                  f"{os.path.join(run.log_dir, 'train.log')}; re-run this command to resume", file=sys.stderr)
            return rc or 1
        print(f"== {run.name}: done in {time.time() - start:.0f} s", flush=True)
    report = build_report(args, variants, seeds, runs, base)
    write_report(report, args.output)
    print(f"wrote {os.path.join(args.output, 'report.md')}, report.json and {len(report['figures'])} figure(s)")
    for claim in ("lower_perplexity", "sharper_routing"):
        print(f"{claim.replace('_', ' ')}: {_overall(report['claims'][claim])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
