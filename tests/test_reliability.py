"""Trusting a long run to the trainer (issue 14): checkpoints load no code, resume never silently
starts over or takes another model, one run per directory, nothing left behind after SIGKILL or
an interrupted preprocess, and bad input is a one-line error with exit status 2.

Trainer runs are real processes on the tiny config of tests/test_train.py.
"""

import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch

from megatron_delta import checkpointing, data
from megatron_delta.run_config import load_run_config
from megatron_delta.run_lock import RunDirectoryLock

import launcher
from test_train import REPO, TIMEOUT, TINY, _command, launch, losses


def run(run_dir, data_dir, overrides=(), extra=(), env=None):
    """(exit status, stdout, stderr) of a one-process run."""
    result = launcher.run(_command(run_dir, data_dir, overrides, extra=extra), TIMEOUT, extra_env=env)
    return result.returncode, result.stdout, result.stderr


def main_exit(argv, capsys):
    """megatron_delta.train.main in this process (for errors found before any process group)."""
    from megatron_delta.train import main

    status = main(argv)
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_dir):
    """6 steps with a checkpoint every 2 and keep_last 2, started with --resume auto in an empty
    directory: iter_0000004 and iter_0000006 remain."""
    run_dir = str(tmp_path_factory.mktemp("saved"))
    out = launch(run_dir, data_dir, ["training.train_iters=6", "checkpoint.save_interval=2", "checkpoint.keep_last=2"],
                 extra=["--resume", "auto"])
    return run_dir, out


def copy_run(saved_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(saved_run[0], run_dir)
    return run_dir, os.path.join(run_dir, "checkpoints")


def metrics_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]


# ---------------------------------------------------------------------------------------------
# Checkpoints: manifest, keep_last, resume


def test_fresh_start_manifest_and_keep_last(saved_run):
    run_dir, out = saved_run
    assert "--resume auto: no checkpoint in" in out and "starting from step 0" in out
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000006", "latest"]
    assert f"deleted {os.path.join(ckpt, 'iter_0000002')} (checkpoint.keep_last=2)" in out
    newest = os.path.join(ckpt, "iter_0000006")
    with open(os.path.join(newest, checkpointing.MANIFEST)) as f:
        files = json.load(f)["files"]
    assert {".metadata", "metadata.json", "run_config.yaml"} <= set(files)  # + common.pt before 0.19
    assert any(name.endswith(".distcp") for name in files)
    assert all(files[name]["bytes"] == os.path.getsize(os.path.join(newest, name)) for name in files)
    assert checkpointing.verify(newest) is None


def test_resume_auto_falls_back_past_a_damaged_checkpoint(saved_run, data_dir, tmp_path):
    """The newest checkpoint truncated and `latest` deleted: resume from iter_0000004, say why,
    and train steps 5-6 exactly as the uninterrupted run did."""
    run_dir, ckpt = copy_run(saved_run, tmp_path)
    damaged = os.path.join(ckpt, "iter_0000006", "__0_0.distcp")
    size = os.path.getsize(damaged)
    os.truncate(damaged, size // 2)
    os.remove(os.path.join(ckpt, "latest"))
    before = metrics_steps(run_dir)

    out = launch(run_dir, data_dir, ["training.train_iters=6", "checkpoint.save_interval=2"], extra=["--resume", "auto"])
    assert (f"skipped iter_0000006 (__0_0.distcp has {size // 2} bytes, the save wrote {size}); resuming from "
            "iter_0000004") in out
    assert "iteration 4, 32 samples consumed" in out
    assert f"note: replacing {os.path.join(ckpt, 'iter_0000006')}" in out
    assert metrics_steps(run_dir) == before + [5, 6]
    original = losses(saved_run[0])
    assert {step: losses(run_dir)[step] for step in (5, 6)} == {step: original[step] for step in (5, 6)}
    assert checkpointing.verify(os.path.join(ckpt, "iter_0000006")) is None


def flip_bytes(path, offset=100):
    """Change 8 bytes of a file, keeping its size (what a size check cannot see)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        flipped = bytes(byte ^ 0xFF for byte in f.read(8))
        f.seek(offset)
        f.write(flipped)


def test_resume_auto_refuses_to_start_over(saved_run, data_dir, tmp_path):
    """No manifest in the newest checkpoint, an altered file in the other: exit 2, both named.
    (The altered file passes the size check before the job starts; the ranks' checksums find it.)"""
    run_dir, ckpt = copy_run(saved_run, tmp_path)
    os.remove(os.path.join(ckpt, "iter_0000006", checkpointing.MANIFEST))
    flip_bytes(os.path.join(ckpt, "iter_0000004", "__0_0.distcp"))
    status, _, err = run(run_dir, data_dir, ["training.train_iters=6"], extra=["--resume", "auto"])
    assert status == 2, err[-3000:]
    assert "no complete checkpoint" in err and "iter_0000006: no manifest.json" in err
    assert "iter_0000004: __0_0.distcp differs from what the save wrote (sha256 mismatch)" in err
    assert "Traceback" not in err


def test_ranks_checksum_a_share_of_the_files_each(saved_run, tmp_path):
    """verify's share: a file altered in rank 1's share of two is found by rank 1 only; rank 0
    does not read it."""
    checkpoint = str(tmp_path / "iter")
    shutil.copytree(os.path.join(saved_run[0], "checkpoints", "iter_0000006"), checkpoint)
    with open(os.path.join(checkpoint, checkpointing.MANIFEST)) as f:
        names = sorted(json.load(f)["files"])
    altered = names[1]  # rank 1's first of two ranks' shares
    flip_bytes(os.path.join(checkpoint, altered), offset=0)
    assert checkpointing.verify(checkpoint, share=(0, 2)) is None
    assert checkpointing.verify(checkpoint, share=(1, 2)) == f"{altered} differs from what the save wrote (sha256 mismatch)"
    assert checkpointing.verify(checkpoint, checksums=False) is None
    assert checkpointing.verify(checkpoint) == checkpointing.verify(checkpoint, share=(1, 2))


def test_two_ranks_agree_to_skip_a_checkpoint_only_one_of_them_checksummed(saved_run, data_dir, tmp_path):
    """A file of iter_0000006 altered in rank 1's share: both ranks skip it (rank 0 alone would
    have taken it, and the ranks would have loaded different steps) and resume from iter_0000004."""
    run_dir, ckpt = copy_run(saved_run, tmp_path)
    newest = os.path.join(ckpt, "iter_0000006")
    with open(os.path.join(newest, checkpointing.MANIFEST)) as f:
        altered = sorted(json.load(f)["files"])[1]
    flip_bytes(os.path.join(newest, altered), offset=0)
    assert checkpointing.verify(newest, share=(0, 2)) is None
    out = launch(run_dir, data_dir, ["training.train_iters=6", "checkpoint.save_interval=2"], nproc=2,
                 extra=["--resume", "auto"])
    assert (f"skipped iter_0000006 ({altered} differs from what the save wrote (sha256 mismatch)); resuming from "
            "iter_0000004") in out
    assert "iteration 4, 32 samples consumed" in out
    assert metrics_steps(run_dir)[-2:] == [5, 6]


@pytest.mark.parametrize("overrides, allowed, changes", [
    (["delta.variant=standard"], [], ["delta.variant: delta_block -> standard"]),
    (["model.hidden_size=128", "training.lr=0.002"], ["training.lr"], ["model.hidden_size: 64 -> 128"]),
    (["training.train_iters=9"], [], ["training.train_iters: 6 -> 9"]),
])
def test_resume_refuses_another_config(saved_run, data_dir, tmp_path, capsys, overrides, allowed, changes):
    run_dir, _ = copy_run(saved_run, tmp_path)
    extra = ["--resume", "auto", *[f"--allow-config-change={field}" for field in allowed]]
    status, err = main_exit(_command(run_dir, data_dir, ["training.train_iters=6", *overrides], extra=extra)[3:],
                            capsys)
    (line,) = [line for line in err.splitlines() if "error:" in line]  # megatron-core may warn before it
    assert status == 2
    assert re.search(r"saved with a different config: (.*)\. Pass --allow-config-change", line).group(1).split("; ") \
        == changes


def test_allowed_and_layout_changes_resume(saved_run, data_dir):
    """A deliberate change named with --allow-config-change, the mesh and memory knobs pass."""
    sets = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=64", "training.global_batch_size=8",
            "training.train_iters=6", "training.lr_decay_iters=8", "training.lr_warmup_iters=2",
            "training.eval_interval=null", "training.eval_iters=2", "training.lr=0.002",
            "training.micro_batch_size=4", "parallel.tensor_model_parallel_size=2",
            f"logging.dir={saved_run[0]}", f"data.cache_dir={data_dir}", "checkpoint.resume=auto"]
    cfg = load_run_config(os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml"), sets)
    path, weights_only, notes = checkpointing.starting_point(cfg, ["training.lr"])
    assert path == os.path.join(saved_run[0], "checkpoints", "iter_0000006") and not weights_only and not notes
    with pytest.raises(checkpointing.CheckpointError, match=r"training.lr: 0.003 -> 0.002"):
        checkpointing.starting_point(cfg, [])


def test_unknown_allowed_field_is_an_error(data_dir, tmp_path, capsys):
    status, err = main_exit(_command(str(tmp_path), data_dir, extra=["--allow-config-change", "training.lrr"])[3:],
                            capsys)
    assert status == 2 and "--allow-config-change training.lrr: not a model/delta/training/data field" in err


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint someone else wrote runs none of their code


class WritesMarker:
    """Unpickling this runs a shell command that creates `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


@pytest.fixture
def planted(saved_run, tmp_path):
    """A copy of iter_0000006 without a manifest (like a checkpoint from elsewhere), and a marker path."""
    checkpoint = str(tmp_path / "foreign")
    shutil.copytree(os.path.join(saved_run[0], "checkpoints", "iter_0000006"), checkpoint)
    os.remove(os.path.join(checkpoint, checkpointing.MANIFEST))
    return checkpoint, str(tmp_path / "marker")


def read_metadata(checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(checkpoint).read_metadata()  # torch's reader: plain pickle


def plant_metadata(checkpoint, marker):
    metadata = read_metadata(checkpoint)
    metadata.planted = WritesMarker(marker)  # any attribute: pickle restores the instance dict
    with open(os.path.join(checkpoint, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    read_metadata(checkpoint)  # the plant is live: an unrestricted reader runs it
    assert os.path.exists(marker)
    os.remove(marker)


def plant_byte_entry(checkpoint, marker):
    """Point the rng_state entry at a torch.save'd WritesMarker appended to its .distcp file."""
    metadata = read_metadata(checkpoint)
    index = next(i for i in metadata.storage_data if i.fqn.startswith("rng_state"))
    blob = io.BytesIO()
    torch.save([WritesMarker(marker)], blob)
    info = metadata.storage_data[index]
    path = os.path.join(checkpoint, info.relative_path)
    info.offset, info.length = os.path.getsize(path), len(blob.getvalue())
    with open(path, "ab") as f:
        f.write(blob.getvalue())
    with open(os.path.join(checkpoint, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    torch.load(io.BytesIO(blob.getvalue()), weights_only=False)  # live
    assert os.path.exists(marker)
    os.remove(marker)


def test_planted_metadata_is_refused_by_the_trainer(planted, data_dir, tmp_path):
    checkpoint, marker = planted
    plant_metadata(checkpoint, marker)
    status, out, err = run(str(tmp_path / "run"), data_dir, ["training.train_iters=6", f"checkpoint.load={checkpoint}"])
    assert status == 2, err[-3000:]
    assert f"error: refused to load {checkpoint}: it contains pickled data that needs posix.system" in err
    assert "Traceback" not in err and not os.path.exists(marker)


READING_COMMANDS = [
    ["convert", "export", "--checkpoint", "{checkpoint}", "--output", "{out}"],
    ["generate", "--checkpoint", "{checkpoint}", "--prompt", "def ", "--max-new-tokens", "2"],
    ["evaluate", "--checkpoint", "{checkpoint}", "--data-prefix", "{out}"],
]


@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda command: command[0])
def test_planted_metadata_is_refused_by_every_command_that_reads_checkpoints(planted, tmp_path, command):
    checkpoint, marker = planted
    plant_metadata(checkpoint, marker)
    argv = [arg.format(checkpoint=checkpoint, out=str(tmp_path / "out")) for arg in command]
    result = launcher.run(launcher.cli_command(*argv), TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"refused to load {checkpoint}: it contains pickled data that needs posix.system" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(marker)


@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda command: command[0])
def test_truncated_checkpoint_is_refused_by_every_command_that_reads_checkpoints(saved_run, tmp_path, command):
    """A trainer's checkpoint directory (`latest`: iter_0000006) with a file cut short: one line,
    exit 2, before anything is loaded."""
    _, ckpt = copy_run(saved_run, tmp_path)
    newest = os.path.join(ckpt, "iter_0000006")
    damaged = os.path.join(newest, "__0_0.distcp")
    size = os.path.getsize(damaged)
    os.truncate(damaged, size - 1)
    argv = [arg.format(checkpoint=ckpt, out=str(tmp_path / "out")) for arg in command]
    result = launcher.run(launcher.cli_command(*argv), TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: --checkpoint {ckpt}: {newest} is incomplete: __0_0.distcp has {size - 1} bytes, "
            f"the save wrote {size}") in result.stderr
    assert "Traceback" not in result.stderr


def test_safe_reader_refuses_planted_pickles(planted, saved_run, single_process_world):
    from megatron.core.dist_checkpointing import ShardedObject

    checkpoint, marker = planted
    rng = {"rng_state": ShardedObject("rng_state", None, (1, 1, 1), (0, 0, 0), replica_id=0)}
    # The genuine checkpoint loads (numpy RNG state included) through the restricted readers.
    loaded = checkpointing.load(rng, checkpoint)
    assert loaded["rng_state"]["numpy"][0] == "MT19937"
    assert checkpointing.load_common_state_dict(checkpoint)["iteration"] == 6

    plant_byte_entry(checkpoint, marker)
    with pytest.raises(checkpointing.CheckpointError, match="refused to load .* needs posix.system"):
        checkpointing.load(rng, checkpoint)
    torch.save({"iteration": WritesMarker(marker)}, os.path.join(checkpoint, "common.pt"))
    with pytest.raises(checkpointing.CheckpointError, match="needs posix.system"):
        checkpointing.load_common_state_dict(checkpoint)
    plant_metadata(checkpoint, marker)
    with pytest.raises(checkpointing.CheckpointError, match="needs posix.system"):
        checkpointing.load_tensors_metadata(checkpoint)  # what `convert export` reads first
    # The file swapped after the up-front check: torch's own reader is restricted too.
    genuine = os.path.join(saved_run[0], "checkpoints", "iter_0000006")
    with pytest.raises(checkpointing.CheckpointError, match="needs posix.system"):
        with checkpointing._safe_reading(genuine):
            read_metadata(checkpoint)
    assert not os.path.exists(marker)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the switch is scoped


# ---------------------------------------------------------------------------------------------
# One run per directory; nothing left behind


def test_second_run_in_a_directory_fails_naming_the_first(data_dir, tmp_path, capsys):
    lock = RunDirectoryLock(str(tmp_path))
    try:
        status, err = main_exit(_command(str(tmp_path), data_dir)[3:], capsys)
    finally:
        lock.release()
    assert status == 2
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in err


def test_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_delta.run_lock import RunDirectoryLock; "
         "lock = RunDirectoryLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid} on host"):
            RunDirectoryLock(str(tmp_path))
        holder.kill()
        holder.wait()
    finally:
        holder.kill()
    RunDirectoryLock(str(tmp_path)).release()


def processes_with(token):
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("MEGATRON_DELTA_TEST_RUN") == token:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def test_sigkill_after_a_save_leaves_no_process(data_dir, tmp_path):
    token = uuid.uuid4().hex
    proc = subprocess.Popen(_command(str(tmp_path), data_dir, ["training.train_iters=200", "checkpoint.save_interval=2"]),
                            cwd=REPO, env=launcher.env(MEGATRON_DELTA_TEST_RUN=token),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + TIMEOUT
        while not os.path.exists(os.path.join(str(tmp_path), "checkpoints", "latest")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        time.sleep(1)  # a step or two past the save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while processes_with(token) and time.time() < deadline:
            time.sleep(0.2)
        left = processes_with(token)
        assert not left, [(p.pid, p.ppid(), p.cmdline()[:3]) for p in left]
    finally:
        launcher.kill_tree(proc)
        for process in processes_with(token):
            process.kill()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


@pytest.mark.parametrize("text, message", [
    ("model:\n  hidden_size: 64\n training: {}\n", r":3:2: invalid YAML"),
    ("model: [1, 2\n", r":2:1: invalid YAML"),
    ("", r"is empty"),
    ("# nothing but a comment\n", r"is empty"),
    ("training:\n  lr: .nan\n", r"training.lr=nan must be a finite number"),
    ("training:\n  lr: 0\n", r"training.lr=0.0 must be > 0"),
    ("training:\n  lr: -1e-4\n", r"training.lr=-0.0001 must be > 0"),
    ("training:\n  min_lr: inf\n", r"training.min_lr='?inf'? must be a finite number"),
    ("data:\n  blend: [0.3, a, b]\n", r"3 items, but weights and prefixes come in pairs"),
    ("data:\n  blend: [a, 0.3, b, 0.7]\n", r"'a', '0.3' is not a weight, prefix pair"),
    ("data:\n  blend: [0.3, a, -1, b]\n", r"every weight must be > 0 and finite, not -1 \(of b\)"),
    ("checkpoint:\n  keep_last: 0\n", r"checkpoint.keep_last=0 must be >= 1 or null"),
    ("training:\n  adam_beta2: 1.0\n", r"training.adam_beta2=1.0 must be in \[0, 1\)"),
    ("training:\n  adam_eps: 0\n", r"training.adam_eps=0.0 must be > 0"),
    ("model:\n  hidden_dropout: 1.5\n", r"model.hidden_dropout=1.5 must be in \[0, 1\)"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    status, err = main_exit(["--config", str(config), f"--set=logging.dir={tmp_path}"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_other_bad_command_lines_are_one_line_exit_2(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"training:\n  lr: 3e-4  # caf\xe9\n")
    status, err = main_exit(["--config", str(config)], capsys)
    assert status == 2 and f"{config}: not UTF-8 text (byte 0xe9" in err
    config.write_text("training:\n  lr: 3.0e-4\n")
    status, err = main_exit(["--config", str(config), "--set", "training.lr=[1"], capsys)
    assert status == 2 and "--set 'training.lr=[1': the value is not valid YAML" in err
    (tmp_path / "a_file").write_text("")
    status, err = main_exit(["--config", TINY, f"--set=logging.dir={tmp_path / 'a_file'}"], capsys)
    assert status == 2 and err.strip().splitlines()[-1] == (
        f"megatron-delta train: error: logging.dir='{tmp_path / 'a_file'}' cannot be the run directory: File exists")


@pytest.fixture
def small_dataset(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(f"paragraph number {i} " * 5 for i in range(200)))
    prefix = str(tmp_path / "corpus")
    data.preprocess(str(source), prefix, data.load_tokenizer("byte"), append_eod=True, progress=False)
    return prefix


def test_damaged_dataset_is_an_error(small_dataset, tmp_path):
    prefix = small_dataset
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size - 10)
    with pytest.raises(data.DataError, match=f"corpus.bin has {size - 10} bytes but .* describes {size}"):
        data._open_indexed_dataset(prefix)
    os.truncate(prefix + ".idx", 100)
    with pytest.raises(data.DataError, match="corpus.idx is not a valid Megatron index"):
        data._open_indexed_dataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(os.urandom(4096))
    with pytest.raises(data.DataError, match="corpus.idx is not a valid Megatron index"):
        data._open_indexed_dataset(prefix)


def test_trainer_on_a_truncated_dataset_exits_2(small_dataset, data_dir, tmp_path):
    os.truncate(small_dataset + ".bin", os.path.getsize(small_dataset + ".bin") // 2)
    status, _, err = run(str(tmp_path / "run"), data_dir, [f"data.blend=[{small_dataset}]"])
    assert status == 2 and "Traceback" not in err
    assert "corpus.bin has" in err and "re-create it with `megatron-delta preprocess" in err


def test_new_data_under_an_old_prefix_gets_a_new_index(tmp_path, single_process_world):
    """GPTDataset's index cache is named after the prefix and the sampling settings; the data
    identity in the cache path keeps a stale index (out-of-range documents) from being reused."""
    tokenizer = data.load_tokenizer("byte")
    prefix, cfg = str(tmp_path / "corpus"), data.DataConfig(blend=[str(tmp_path / "corpus")], split="1,0,0",
                                                           cache_dir=str(tmp_path))
    for documents in (400, 40):
        (tmp_path / "corpus.txt").write_text("\n\n".join(f"document {i} " * 10 for i in range(documents)))
        data.preprocess(str(tmp_path / "corpus.txt"), prefix, tokenizer, append_eod=True, progress=False)
        train, _, _ = data.build_datasets(cfg, tokenizer, seq_length=32, num_samples=(50, 0, 0), seed=1)
        assert len(train) >= 50
        for index in range(len(train)):
            assert train[index]["tokens"].shape == (32,)
    assert len(os.listdir(tmp_path / "index-cache")) == 2


def test_sigterm_during_preprocess_removes_its_temporary_files(tmp_path):
    source = tmp_path / "big.txt"
    source.write_text("\n\n".join(f"paragraph {i} with some words in it" for i in range(400_000)))
    prefix = str(tmp_path / "big")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_delta.cli", "preprocess", "--input", str(source),
                             "--output-prefix", prefix, "--no-progress"], cwd=REPO, env=launcher.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not any(".tmp-" in name for name in os.listdir(tmp_path)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted: nothing written" in err
    assert sorted(os.listdir(tmp_path)) == ["big.txt"]


def test_preprocess_removes_temporaries_of_dead_processes(tmp_path, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, host = int(finished.stdout), socket.gethostname()
    stale = [f"corpus.tmp-{host}-{dead}.bin", f"corpus.tmp-{host}-{dead}.idx", f"corpus.tmp{dead}.bin"]
    kept = [f"corpus.tmp-{host}-{os.getppid()}.bin", f"corpus.tmp-otherhost-{dead}.bin"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    (tmp_path / "corpus.txt").write_text("one\n\ntwo\n")
    assert data.main(["--input", str(tmp_path / "corpus.txt"), "--output-prefix", str(tmp_path / "corpus"),
                      "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["corpus.bin", "corpus.idx", "corpus.txt", *kept])
    assert capsys.readouterr().err.count("left by a killed preprocess") == 3
