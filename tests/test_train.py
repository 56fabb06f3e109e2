"""`megatron-delta train` end to end: real processes (one process, or torchrun over gloo), real
checkpoints, real signals. Every run is a tiny Delta Block model (4 layers, hidden 64) on the
built-in demo corpus, fp32 on CPU.

What is compared (losses are the global token means logged every step in metrics.jsonl):
  * SIGTERM after N steps -> checkpoint + exit 143 -> `--resume auto`: the losses of the
    uninterrupted run, bit for bit (same process count);
  * 2 data-parallel ranks with the distributed optimizer == 1 process (rel. 1e-5);
  * a model-parallel mesh (TP2 + SP x PP2 x VPP2, 4 ranks) resuming the 1-process checkpoint of
    step 4 == the 1-process steps 5-8 (rel. 1e-5).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import launcher

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")
TINY_MOE = os.path.join(REPO, "examples", "configs", "tiny_moe_cpu.yaml")
TIMEOUT = 300  # seconds per launched run (~10-25 s on an idle 2-core machine); then the run is killed

# 8 steps of 8 sequences x 64 tokens. The schedule is pinned (lr_decay_iters) so that runs of
# different lengths share it. All runs stay inside the first epoch of the demo corpus, where
# GPTDataset's sample order does not depend on the number of samples requested.
COMMON = [
    "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=64",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=8",
    "training.lr_decay_iters=8", "training.lr_warmup_iters=2", "training.eval_interval=null",
    "training.eval_iters=2", "logging.log_interval=1", "logging.tensorboard=false",
]


def _command(run_dir, data_dir, overrides=(), nproc=1, extra=(), config=TINY):
    sets = [f"--set={item}" for item in [*COMMON, f"data.cache_dir={data_dir}", f"logging.dir={run_dir}", *overrides]]
    module = ["-m", "megatron_delta.train"]
    launch_with = [sys.executable, *module] if nproc == 1 else launcher.torchrun_command(nproc, *module)
    return [*launch_with, "--config", config, *sets, *extra]


def launch(run_dir, data_dir, overrides=(), nproc=1, extra=(), config=TINY):
    """Run to completion under a hard timeout; returns stdout."""
    result = launcher.run(_command(run_dir, data_dir, overrides, nproc, extra, config), timeout=TIMEOUT)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def metrics(run_dir):
    """{step: record} merged over metrics.jsonl lines (a later line for a step wins)."""
    records = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            records.setdefault(record["step"], {}).update(record)
    return records


def losses(run_dir):
    return {step: r["loss"] for step, r in metrics(run_dir).items() if "loss" in r}


def assert_close(actual: dict, expected: dict, rel: float):
    assert actual, "no losses logged"
    for step, loss in actual.items():
        assert loss == pytest.approx(expected[step], rel=rel, abs=0), f"step {step}: {loss} vs {expected[step]}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """8 uninterrupted steps in one process, checkpoints at steps 4 and 8, TensorBoard on."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    out = launch(run_dir, data_dir, ["checkpoint.save_interval=4", "logging.tensorboard=true"])
    return run_dir, out


def test_progress_summary_and_checkpoint_layout(reference):
    run_dir, out = reference
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 8
    for key in ("loss", "lr", "grad norm", "tok/s", "elapsed", "ETA", "routing max-w"):
        assert key in lines[-1], key
    summary = out.splitlines()[-1]
    assert summary.startswith("done: 8 steps") and "val ppl" in summary

    log = losses(run_dir)
    assert sorted(log) == list(range(1, 9))
    assert log[8] < log[1] - 0.5  # 5.94 -> 4.73 measured: it learns
    final = metrics(run_dir)[8]
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    assert 1.0 < final["val_loss"] < log[1]
    routing = final["routing"]  # 4 layers x 2 sublayers; delta_block with 2 blocks
    assert sorted(routing) == [f"layer_{i:02d}.{s}" for i in range(1, 5) for s in ("attention", "mlp")]
    assert [routing[f"layer_0{i}.mlp"]["num_sources"] for i in range(1, 5)] == [1, 1, 2, 2]
    for stats in routing.values():
        assert sum(stats["mean_weight"]) == pytest.approx(1.0, abs=1e-5)
    assert os.listdir(os.path.join(run_dir, "tensorboard"))

    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000008", "latest"]
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read() == "iter_0000008"
    assert os.path.isfile(os.path.join(ckpt, "iter_0000008", "run_config.yaml"))


def test_sigterm_checkpoint_resumes_bit_for_bit(reference, data_dir, tmp_path):
    """SIGTERM a real run, which saves at the next step boundary and exits 143; `--resume auto`
    then continues from that checkpoint: N steps + resume + 2 steps == the uninterrupted run."""
    ref_dir, _ = reference
    run_dir = str(tmp_path)
    # Long enough to be interrupted; the pinned schedule keeps steps 1-8 equal to the reference.
    proc = subprocess.Popen(_command(run_dir, data_dir, ["training.train_iters=200"]), cwd=REPO, env=launcher.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not any(step >= 2 for step in _losses_if_any(run_dir)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        launcher.kill_tree(proc)
    assert proc.returncode == 143, f"{out[-2000:]}\n{err[-3000:]}"
    assert "stop signal received" in out
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        stopped_at = int(f.read().removeprefix("iter_"))
    assert stopped_at >= 2 and max(losses(run_dir)) == stopped_at
    # The remains of an interrupted later save must not be taken for a checkpoint.
    os.makedirs(os.path.join(run_dir, "checkpoints", f"iter_{stopped_at + 1:07d}.tmp"))

    out = launch(run_dir, data_dir, [f"training.train_iters={stopped_at + 2}"],
                 extra=["--resume", "auto", "--allow-config-change", "training.train_iters"])
    assert f"iteration {stopped_at}, {stopped_at * 8} samples consumed" in out
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, stopped_at + 3))
    assert_close({s: l for s, l in resumed.items() if s <= 8}, losses(ref_dir), rel=0.0)  # bit for bit


def _losses_if_any(run_dir):
    try:
        return losses(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line being written
        return {}


def test_data_parallel_with_distributed_optimizer_matches_one_process(reference, data_dir, tmp_path):
    ref_dir, _ = reference
    out = launch(str(tmp_path), data_dir, ["parallel.use_distributed_optimizer=true"], nproc=2)
    assert "dp 2" in out
    assert_close(losses(str(tmp_path)), losses(ref_dir), rel=1e-5)
    assert metrics(str(tmp_path))[8]["val_loss"] == pytest.approx(metrics(ref_dir)[8]["val_loss"], rel=1e-5)


def test_model_parallel_mesh_resumes_one_process_checkpoint(reference, data_dir, tmp_path):
    """TP2 (sequence parallel) x PP2 x VPP2 on 4 ranks continues the 1-process run from its step-4
    checkpoint: resharding, the interleaved schedule with packed routing sources, SP gradient
    reduction of the routing parameters and the mesh-independent vocabulary padding all hold."""
    ref_dir, _ = reference
    step4 = os.path.join(ref_dir, "checkpoints", "iter_0000004")
    out = launch(str(tmp_path), data_dir, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                           "parallel.pipeline_model_parallel_size=2",
                                           "parallel.virtual_pipeline_model_parallel_size=2"],
                 nproc=4, extra=["--resume", step4])
    assert "tp 2 pp 2 vpp 2 dp 1 sp" in out and "iteration 4" in out
    resumed = losses(str(tmp_path))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert_close(resumed, losses(ref_dir), rel=1e-5)


@pytest.mark.parametrize("overrides, extra, message", [
    (["parallel.tensor_model_parallel_size=3"], [], "tensor_model_parallel_size"),
    (["training.lr_warmup=5"], [], "training.lr_warmup"),
    ([], ["--resume", "/nonexistent/checkpoints"], "checkpoint.resume"),
])
def test_bad_config_fails_before_start(data_dir, tmp_path, overrides, extra, message, capsys):
    import torch.distributed

    from megatron_delta.train import main

    # Other test modules may have left a one-rank world behind in this process: the trainer must
    # not have started one of its own.
    was_initialized = torch.distributed.is_initialized()
    argv = _command(str(tmp_path), data_dir, overrides, extra=extra)[3:]  # after `python -m megatron_delta.train`
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert torch.distributed.is_initialized() == was_initialized
    assert not os.path.exists(os.path.join(str(tmp_path), "metrics.jsonl"))


def test_moe_config_trains_with_expert_parallelism_and_logs_aux_loss_and_expert_load(data_dir, tmp_path,
                                                                                    single_process_world):
    """examples/configs/tiny_moe_cpu.yaml (dense first layer, 3 MoE layers of 4 experts) on 2
    ranks with the experts split over them (EP2, alltoall): the run counts the whole model (each rank
    holds 2 of the 4 experts), the loss goes down, and every
    logged step carries the load-balancing loss and each MoE layer's per-expert token shares."""
    from megatron_delta.parameters import count_parameters
    from megatron_delta.run_config import build_model_chunk, build_transformer_config, load_run_config

    run_dir = str(tmp_path / "moe")
    out = launch(run_dir, data_dir, ["parallel.expert_model_parallel_size=2", "checkpoint.save_on_exit=false"],
                 nproc=2, config=TINY_MOE)
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 8 and "load_balancing_loss" in lines[-1] and "expert_load_max" in lines[-1]
    log = metrics(run_dir)
    cfg = load_run_config(TINY_MOE, COMMON)
    whole_model = build_model_chunk(cfg, build_transformer_config(cfg, on_gpu=False), 384)
    total, routing, _ = count_parameters([whole_model], 1)
    assert (log[8]["params"], log[8]["routing_params"]) == (total, routing)
    assert f"{total / 1e6:.2f}M params" in out and "ep 2" in out
    assert log[8]["loss"] < log[1]["loss"] - 0.5
    for step in range(1, 9):
        record = log[step]
        # Unweighted switch loss: 1.0 for a perfectly balanced router, up to num_experts.
        assert 0.9 < record["moe_load_balancing_loss"] < 4.0
        assert sorted(record["expert_load"]) == ["layer_02", "layer_03", "layer_04"]
        for share in record["expert_load"].values():
            assert len(share) == 4 and sum(share) == pytest.approx(1.0, abs=1e-3)
        assert record["moe_expert_load_max"] == pytest.approx(
            4 * max(max(share) for share in record["expert_load"].values()), abs=1e-3)


def test_mtp_trains_and_its_checkpoint_resumes_on_a_pipeline_mesh(data_dir, tmp_path):
    """model.mtp_num_layers=1 trains Megatron's MTP block next to the routed decoder (its loss is
    logged and goes down); the 1-process step-4 checkpoint holds the MTP weights and resumes on
    PP2, where the MTP block and a copy of the embedding sit on the last stage: the next steps'
    losses and MTP losses equal the uninterrupted run's (step 5's MTP loss is computed from the
    loaded MTP weights alone, before any update)."""
    from torch.distributed.checkpoint import FileSystemReader

    mtp = ["model.mtp_num_layers=1"]
    ref_dir, pp_dir = str(tmp_path / "one_process"), str(tmp_path / "pp2")
    out = launch(ref_dir, data_dir, [*mtp, "checkpoint.save_interval=4", "checkpoint.save_on_exit=false"])
    assert "mtp_loss" in [line for line in out.splitlines() if line.startswith("step ")][-1]
    ref = metrics(ref_dir)
    assert ref[8]["loss"] < ref[1]["loss"] - 0.5 and ref[8]["mtp_loss"] < ref[1]["mtp_loss"] - 0.5
    step4 = os.path.join(ref_dir, "checkpoints", "iter_0000004")
    saved = FileSystemReader(step4).read_metadata().state_dict_metadata
    assert "mtp.layers.0.eh_proj.weight" in saved and "mtp.layers.0.transformer_layer.mlp.linear_fc1.weight" in saved

    out = launch(pp_dir, data_dir, [*mtp, "parallel.pipeline_model_parallel_size=2", "checkpoint.save_on_exit=false"],
                 nproc=2, extra=["--resume", step4])
    assert "tp 1 pp 2 dp 1" in out and "iteration 4" in out
    resumed = metrics(pp_dir)
    assert sorted(losses(pp_dir)) == [5, 6, 7, 8]
    assert resumed[5]["mtp_loss"] < ref[1]["mtp_loss"] - 0.3  # trained MTP weights, not a fresh init
    for key in ("loss", "mtp_loss"):
        assert_close({s: r[key] for s, r in resumed.items() if key in r}, {s: r[key] for s, r in ref.items()}, rel=1e-5)
