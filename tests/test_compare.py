"""`megatron-delta compare`: the seed statistics on known numbers, the claim verdicts, and one real
2-variant x 2-seed comparison (4 tiny `megatron-delta train` processes of 4 steps) whose report,
JSON and figures are checked against the runs' metrics.jsonl, then interrupted and re-run."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import yaml

from megatron_delta import compare
from megatron_delta.routing_plot import read_records
from megatron_delta.seed_stats import estimate, paired_difference, t_cdf, t_quantile

import launcher

TINY = os.path.join(launcher.REPO, "examples", "configs", "tiny_cpu.yaml")
TIMEOUT = 600  # seconds for one compare command (4 runs: ~60 s on an idle 2-core machine)
TINY_SETS = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64",
    "model.seq_length=32", "training.micro_batch_size=2", "training.global_batch_size=4",
    "training.train_iters=4", "training.lr_warmup_iters=1", "training.eval_interval=2", "training.eval_iters=1",
    "checkpoint.save_interval=2", "logging.log_interval=2", "logging.tensorboard=false",
]


# ---------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("df, expected", [
    (1, 12.706204736174706), (2, 4.302652729749464), (3, 3.182446305284263), (4, 2.7764451051977934),
    (9, 2.2621571628540993), (30, 2.0422724563012373),
])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)
    assert t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-9)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-10)


def test_estimate_and_paired_difference_by_hand():
    # mean 2.5, std sqrt(5/3), half-width t_{0.975,3} * std / 2
    e = estimate([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (e.mean, e.std, e.n) == (2.5, pytest.approx(math.sqrt(5 / 3)), 4)
    assert (e.low, e.high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    # differences -0.2, -0.1, -0.3: mean -0.2, std 0.1, half-width 4.302652729749464 * 0.1 / sqrt(3)
    d = paired_difference([5.0, 4.4, 4.8], [5.2, 4.5, 5.1])
    assert d.mean == pytest.approx(-0.2) and d.std == pytest.approx(0.1)
    assert d.low == pytest.approx(-0.448413771, abs=1e-9) and d.high == pytest.approx(0.048413771, abs=1e-9)
    assert not d.excludes(0.0) and d.excludes(0.1)
    one = estimate([3.0])
    assert (one.std, one.low, one.high) == (None, None, None) and not one.excludes(0.0)


def _variant(losses, standard_losses=None, deep_max=None):
    out = {}
    if standard_losses is not None:
        out["val_loss_minus_standard"] = paired_difference(losses, standard_losses).to_dict()
        out["val_ppl_ratio_to_standard"] = {"mean": 1.0}
    if deep_max is not None:
        out["sharpness"] = {"deep_max_weight_per_seed": deep_max, "deep_uniform_max_weight": 0.25}
    return out


def test_claim_verdicts_follow_the_intervals():
    std = [5.0, 4.4, 4.8]
    variants = {
        "standard": {},
        "delta_block": _variant([4.5, 4.0, 4.4], std, deep_max=[0.65, 0.64, 0.66]),  # clearly lower, sharper
        "delta": _variant([5.5, 4.3, 4.6], std, deep_max=[0.30, 0.50, 0.20]),  # mixed signs
        "attnres_block": _variant([4.9, 4.5, 4.7], std, deep_max=[0.46, 0.52, 0.50]),
        "attnres_full": _variant([5.6, 5.8, 5.7], std, deep_max=[0.22, 0.27, 0.25]),
    }
    c = compare.claims(variants)
    verdicts = {item["variant"]: item["verdict"] for item in c["lower_perplexity"]}
    assert verdicts == {"delta_block": "supports", "delta": "cannot resolve"}
    # each Delta variant against the Attention Residuals variant of the same source granularity
    sharp = {(item["variant"], item["against"]): item["verdict"] for item in c["sharper_routing"]}
    assert sharp == {("delta_block", "attnres_block"): "supports", ("delta", "attnres_full"): "cannot resolve"}
    assert compare._overall(c["lower_perplexity"]) == "mixed: cannot resolve, supports"
    worse = compare.claims({"standard": {}, "delta": _variant([5.2, 4.6, 5.0], std, deep_max=[0.2, 0.21, 0.19]),
                            "attnres_full": _variant([5.0, 4.4, 4.8], std, deep_max=[0.5, 0.6, 0.55])})
    assert worse["lower_perplexity"][0]["verdict"] == "contradicts"
    assert worse["sharper_routing"][0]["verdict"] == "contradicts"
    assert compare._overall(worse["sharper_routing"]) == "contradicted"
    alone = compare.claims({"delta": _variant([1.0], deep_max=[0.5]), "attnres_block": _variant([1.0], deep_max=[0.2])})
    assert [item["verdict"] for item in alone["lower_perplexity"] + alone["sharper_routing"]] == ["not tested"] * 2
    one_seed = compare.claims({"delta_block": _variant([1.0], deep_max=[0.9]),
                               "attnres_block": _variant([1.0], deep_max=[0.1])})
    assert one_seed["sharper_routing"][0]["verdict"] == "cannot resolve"  # one seed: no interval


# ---------------------------------------------------------------------------------------------
# A real comparison


def _compare(output, data_dir, extra=()):
    command = launcher.cli_command("compare", "--config", TINY,
               "--variants", "standard,delta_block", "--seeds", "2", "--output", output,
               *[f"--set={item}" for item in [*TINY_SETS, f"data.cache_dir={data_dir}"]], *extra)
    proc = launcher.run(command, TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("compare"))
    data_dir = str(tmp_path_factory.mktemp("data"))
    stdout = _compare(output, data_dir)
    return output, data_dir, stdout


def _final(run_dir, key):
    return read_records(os.path.join(run_dir, "logs", "metrics.jsonl"), key)


def test_every_run_is_a_train_run_with_one_data_order(comparison):
    output, _, stdout = comparison
    assert "4 runs (standard, delta_block x seeds 1234, 1235), 0 finished, 4 to train" in stdout
    for variant in ("standard", "delta_block"):
        for seed in (1234, 1235):
            run_dir = os.path.join(output, "runs", f"{variant}-seed{seed}")
            with open(os.path.join(run_dir, "checkpoints", "iter_0000004", "run_config.yaml")) as f:
                cfg = yaml.safe_load(f)
            assert (cfg["delta"]["variant"], cfg["training"]["seed"], cfg["data"]["seed"]) == (variant, seed, 1234)
            assert (cfg["model"]["num_layers"], cfg["training"]["train_iters"]) == (2, 4)
    # the seed changes the initialisation: the two standard seeds do not train identically
    losses = [_final(os.path.join(output, "runs", f"standard-seed{s}"), "loss")[2]["loss"] for s in (1234, 1235)]
    assert losses[0] != losses[1]


def test_report_json_and_figures_hold_the_runs_numbers(comparison):
    output, _, _ = comparison
    with open(os.path.join(output, "report.json")) as f:
        report = json.load(f)
    for name in ("report.md", *compare.FIGURES.values()):
        with open(os.path.join(output, name), "rb") as f:
            head = f.read(8)
        assert head.startswith(b"\x89PNG") if name.endswith(".png") else head
    seeds = (1234, 1235)
    runs = {v: [os.path.join(output, "runs", f"{v}-seed{s}") for s in seeds] for v in ("standard", "delta_block")}
    val = {v: [_final(d, "val_loss")[4]["val_loss"] for d in dirs] for v, dirs in runs.items()}
    summary = {v: [_final(d, "peak_memory_bytes")[4] for d in dirs] for v, dirs in runs.items()}
    for record in summary["standard"] + summary["delta_block"]:  # the trainer's final record
        assert 100 * 2**20 < record["peak_memory_bytes"] < 8 * 2**30  # a process's RSS with torch loaded
        assert 0 < record["train_tokens_per_s"] < 1e7 and record["params"] in (32_928, 33_184)

    # validation loss, perplexity, paired difference, ratios: recomputed from metrics.jsonl
    block = report["variants"]["delta_block"]
    assert block["val_loss"]["mean"] == pytest.approx(np.mean(val["delta_block"]), rel=1e-12)
    assert block["val_ppl"]["mean"] == pytest.approx(np.mean(np.exp(val["delta_block"])), rel=1e-12)
    diffs = np.array(val["delta_block"]) - np.array(val["standard"])
    half = 12.706204736174706 * diffs.std(ddof=1) / math.sqrt(2)
    assert block["val_loss_minus_standard"]["low"] == pytest.approx(diffs.mean() - half, rel=1e-9)
    assert block["val_loss_minus_standard"]["high"] == pytest.approx(diffs.mean() + half, rel=1e-9)
    speed = [np.mean([s["train_tokens_per_s"] for s in summary[v]]) for v in ("delta_block", "standard")]
    assert block["tokens_per_s_ratio"] == pytest.approx(speed[0] / speed[1], rel=1e-12)
    memory = [np.mean([s["peak_memory_bytes"] for s in summary[v]]) for v in ("delta_block", "standard")]
    assert block["peak_memory_ratio"] == pytest.approx(memory[0] / memory[1], rel=1e-12)
    # delta_block routes 4 sublayers: query + key-norm weight of hidden 32 each = 256 parameters
    assert summary["delta_block"][0]["routing_params"] == block["routing_params"] == block["extra_params"] == 256
    assert "sharpness" not in report["variants"]["standard"]

    # the validation-loss figure plots the seed means of the logged curves
    fig = compare.plot_val_loss(report)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    for variant, dirs in runs.items():
        curves = [_final(d, "val_loss") for d in dirs]
        assert list(lines[variant].get_xdata()) == [2, 4]
        expected = [np.mean([c[step]["val_loss"] for c in curves]) for step in (2, 4)]
        np.testing.assert_allclose(lines[variant].get_ydata(), expected, rtol=1e-12)

    # sharpness by depth: the per-sublayer max weight and entropy / ln n of the last routing record
    routing = [_final(d, "routing")[4]["routing"] for d in runs["delta_block"]]
    labels = sorted(routing[0])
    assert labels == ["layer_01.attention", "layer_01.mlp", "layer_02.attention", "layer_02.mlp"]
    routed = [label for label in labels if routing[0][label]["num_sources"] > 1]
    assert routed == labels[2:]  # the first block routes over the embeddings only
    fig = compare.plot_sharpness(report)
    max_line = next(line for line in fig.axes[0].lines if line.get_label() == "delta_block")
    ent_line = next(line for line in fig.axes[1].lines if line.get_label() == "delta_block")
    assert list(max_line.get_xdata()) == [3, 4]
    np.testing.assert_allclose(max_line.get_ydata(), [np.mean([r[k]["max_weight"] for r in routing]) for k in routed])
    np.testing.assert_allclose(ent_line.get_ydata(),
                               [np.mean([r[k]["entropy"] / math.log(2) for r in routing]) for k in routed])
    deep = [np.mean([r[k]["max_weight"] for k in routed]) for r in routing]  # deep half = sublayers 3, 4
    assert block["sharpness"]["deep_max_weight"]["mean"] == pytest.approx(np.mean(deep), rel=1e-12)
    assert block["sharpness"]["deep_uniform_max_weight"] == 0.5

    # the heatmap shows the seed mean of the mean routing weights
    fig = compare.plot_heatmaps(report)
    shown = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
    expected = np.full((4, 2), np.nan)
    for row, label in enumerate(labels):
        weights = np.mean([r[label]["mean_weight"] for r in routing], axis=0)
        expected[row, : len(weights)] = weights
    np.testing.assert_allclose(shown, expected, rtol=1e-12)

    with open(os.path.join(output, "report.md")) as f:
        text = f.read()
    assert "## Statement" in text and "Claim 1" in text and "Claim 2" in text
    assert f"{block['val_loss']['mean']:.4f}" in text
    for name in compare.FIGURES.values():
        assert f"]({name})" in text


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(comparison):
    output, data_dir, _ = comparison
    runs = os.path.join(output, "runs")
    # Make delta_block-seed1235 look interrupted after its step-2 checkpoint.
    victim = os.path.join(runs, "delta_block-seed1235")
    original_val = _final(victim, "val_loss")[4]["val_loss"]
    shutil.rmtree(os.path.join(victim, "checkpoints", "iter_0000004"))
    with open(os.path.join(victim, "checkpoints", "latest"), "w") as f:
        f.write("iter_0000002")
    metrics = os.path.join(victim, "logs", "metrics.jsonl")
    with open(metrics) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 2]
    with open(metrics, "w") as f:
        f.writelines(kept)

    def snapshot(name):
        files = {}
        for root, _, names in os.walk(os.path.join(runs, name)):
            for file in names:
                path = os.path.join(root, file)
                with open(path, "rb") as f:
                    files[path] = (os.stat(path).st_mtime_ns, f.read())
        return files

    others = ["standard-seed1234", "standard-seed1235", "delta_block-seed1234"]
    before = {name: snapshot(name) for name in others}
    stdout = _compare(output, data_dir)
    assert "3 finished, 1 to train" in stdout
    assert f"[delta_block-seed1235] resumed from {os.path.join(victim, 'checkpoints', 'iter_0000002')}: iteration 2" in stdout
    assert [line for line in stdout.splitlines() if "] megatron-delta train:" in line] == [
        line for line in stdout.splitlines() if line.startswith("[delta_block-seed1235] megatron-delta train:")]
    assert {name: snapshot(name) for name in others} == before
    # the resumed run ends where the uninterrupted one did
    assert _final(victim, "val_loss")[4]["val_loss"] == pytest.approx(original_val, rel=1e-6)


def test_bad_command_lines_fail_before_anything_runs(comparison, capsys):
    output, data_dir, _ = comparison
    base = ["--config", TINY, "--output", output, *[f"--set={item}" for item in TINY_SETS],
            f"--set=data.cache_dir={data_dir}", "--variants", "standard,delta_block", "--seeds", "2"]
    cases = [
        (["--variants", "standard,deltaa"], "'deltaa' is unknown"),
        (["--set", "training.seed=7"], "compare sets training.seed itself"),
        (["--seeds", "two"], "--seeds 'two'"),
        (["--set", "training.lr=1e-3"], "training.lr=0.003"),  # output dir holds runs trained otherwise
    ]
    for extra, message in cases:
        assert compare.main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_slurm_dry_run_submits_each_run_into_its_own_directory(tmp_path, capsys):
    output = str(tmp_path / "cmp")
    assert compare.main(["--config", TINY, "--variants", "delta", "--seeds", "7,9", "--output", output, "--slurm",
                         "--sbatch-args", "--nodes=2 --time=1:00:00", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "sbatch" in line]
    assert len(lines) == 2
    for line, seed in zip(lines, (7, 9)):
        run_dir = os.path.join(output, "runs", f"delta-seed{seed}")
        assert line.startswith(f"delta-seed{seed}: MEGATRON_DELTA_RUN_DIR={run_dir} sbatch --parsable ")
        assert f"--nodes=2 --time=1:00:00 {compare.SBATCH_SCRIPT} {TINY} " in line
        for item in (f"delta.variant=delta", f"training.seed={seed}", "data.seed=1234",
                     f"logging.dir={run_dir}/logs", f"checkpoint.dir={run_dir}/checkpoints"):
            assert f"--set={item}" in line
    assert not os.path.exists(output)  # a dry run writes nothing
