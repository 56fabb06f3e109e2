"""Checkpoints of `megatron-delta train`: verified dist_checkpointing saves, and the one reader
through which every checkpoint is loaded (trainer, `convert export`).

Layout of a checkpoint directory (checkpoint.dir, default <logging.dir>/checkpoints):

    iter_0000020/       Megatron dist-checkpoint (torch_dist) + run_config.yaml + manifest.json
    iter_0000030/
    latest              "iter_0000030", written last

A save is written to iter_XXXXXXX.tmp. When every rank has finished, the ranks checksum the files
(sha256, each rank a share of them) and rank 0 writes manifest.json (every file with its size
and checksum), renames the directory and then points `latest` at it. A checkpoint is *complete*
when its manifest verifies: every listed file present with its size and checksum.

Resuming (`starting_point`): `--resume auto` takes the newest complete checkpoint of the run and
says which ones it skipped and why (a missing, truncated or altered file, no manifest); with
checkpoints present but none complete it stops (exit 2) rather than start over. Like the save, the
check divides the checksumming among the ranks (`verify_together`): the job reads a checkpoint once. The resolved run
config saved with the checkpoint is compared with the requested one (`config_changes`).

Loading (`load`, `load_common_state_dict`, `load_tensors_metadata`): a checkpoint is pickled data
in three places: torch's `.metadata` (read by torch's FileSystemReader with plain pickle), byte
entries inside the .distcp files (torch's DefaultLoadPlanner unpickles them with
weights_only=False) and common.pt. `_safe_reading` makes all three refuse anything but plain data:
`.metadata` goes through an unpickler that knows only torch's checkpoint metadata classes, and
every torch.load (byte entries, common.pt) runs with weights_only=True plus the numpy pieces of
our RNG state. A checkpoint that needs anything else is refused with CheckpointError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import queue
import random
import re
import shutil

import numpy as np
import torch
import yaml

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.utils import unwrap_model

from megatron_delta.run_config import RunConfig, RunConfigError, from_dict

MANIFEST = "manifest.json"
LATEST = "latest"
RUN_CONFIG = "run_config.yaml"
_ITERATION_DIR = re.compile(r"iter_(\d{7})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, damaged, unsafe, or for another model."""


# ---------------------------------------------------------------------------------------------
# The safe reader


# Everything a torch_dist `.metadata` pickle refers to: torch's checkpoint-metadata dataclasses,
# including the save-plan classes it can hold. torch dtypes are allowed by their type.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.planner", name)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


def _numpy_array_globals() -> list:
    """What weights_only=True needs for the numpy RNG state (a uint32 array) in rng_state."""
    reconstruct = np.zeros(0, dtype=np.uint32).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class _RefusedGlobal(pickle.UnpicklingError):
    """Raised by _MetadataUnpickler. torch may report it only as text inside another exception,
    so the message carries a recognisable prefix."""

    PREFIX = "the restricted checkpoint reader refused "

    def __init__(self, name: str):
        super().__init__(self.PREFIX + name)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        known = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not known:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class _MetadataPickle:
    """Stands in for the `pickle` module inside torch.distributed.checkpoint.filesystem while a
    checkpoint is read: its FileSystemReader.read_metadata calls `pickle.load` on `.metadata`."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file):
        return _MetadataUnpickler(file).load()


@contextlib.contextmanager
def _safe_reading(path: str):
    """Install the restricted readers around one Megatron read of the checkpoint at `path` and
    turn a refusal into a CheckpointError. TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's own switch
    that makes every torch.load weights_only, also where the caller passed weights_only=False
    (DefaultLoadPlanner.load_bytes); the `.metadata` pickle needs the one scoped substitution."""
    from torch.distributed.checkpoint import filesystem

    # Read once up front: a refusal inside torch's reader is logged by torch with a traceback.
    metadata = os.path.join(path, ".metadata")
    if os.path.isfile(metadata):
        with open(metadata, "rb") as f, _refusals_as_errors(path):
            try:
                _MetadataPickle.load(f)
            except _RefusedGlobal:
                raise
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
                raise CheckpointError(f"{metadata} is not a readable checkpoint metadata file ({e})") from None
    saved_env = {key: os.environ.pop(key, None)
                 for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    filesystem.pickle = _MetadataPickle()
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), _refusals_as_errors(path):
            yield
    finally:
        filesystem.pickle = pickle
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ.update({key: value for key, value in saved_env.items() if value is not None})


@contextlib.contextmanager
def _refusals_as_errors(path: str):
    try:
        yield
    except BaseException as error:  # torch's CheckpointException is a BaseException
        refused = _refusal(error)
        if refused is None:
            raise
        raise CheckpointError(
            f"refused to load {path}: it contains pickled data that needs {refused}, which is not one of "
            f"the plain checkpoint types this reader accepts (tensors, numbers, strings, containers, torch's "
            f"checkpoint metadata); nothing from it was executed. Load only checkpoints you trust"
        ) from None


def _refusal(error: BaseException) -> str | None:
    """The global that a restricted unpickler refused somewhere in this error, else None. torch's
    distributed checkpoint wraps per-rank errors in a CheckpointException's `failures`, or only
    quotes their message in a new error."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if found := re.search(re.escape(_RefusedGlobal.PREFIX) + r"([\w.]+)", str(e)):
            return found.group(1)
        if "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            return found.group(1) if found else "an object type outside the allow-list"
        failures = getattr(e, "failures", None)  # {rank: (exception, traceback summary)}
        pending += [e.__cause__, e.__context__,
                    *(failure[0] for failure in (failures.values() if isinstance(failures, dict) else ()))]
    return None


def load(sharded_state_dict: dict, path: str) -> dict:
    """dist_checkpointing.load through the safe reader; a checkpoint that does not fit the model
    (other shapes or keys) is a CheckpointError."""
    with _safe_reading(path):
        try:
            return dist_checkpointing.load(sharded_state_dict, path)
        except CheckpointingException as e:
            raise CheckpointError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from None


def load_common_state_dict(path: str) -> dict:
    with _safe_reading(path):
        return dist_checkpointing.load_common_state_dict(path)


def load_tensors_metadata(path: str) -> dict:
    with _safe_reading(path):
        return dist_checkpointing.load_tensors_metadata(path)


# ---------------------------------------------------------------------------------------------
# Completeness: the manifest


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(directory: str) -> list[str]:
    """Every file of a checkpoint (relative paths, sorted), the manifest excepted."""
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, name), directory) for name in names]
    return sorted(name for name in found if name != MANIFEST)


def describe_files(directory: str, names: list[str]) -> dict:
    """{name: {"bytes": size, "sha256": hex}} of these files of `directory`."""
    return {name: {"bytes": os.path.getsize(os.path.join(directory, name)),
                   "sha256": _sha256(os.path.join(directory, name))} for name in names}


def write_manifest(directory: str, files: dict) -> None:
    write_atomically(os.path.join(directory, MANIFEST), json.dumps({"format": 1, "files": files}, indent=1))


def verify(directory: str, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """None if the checkpoint at `directory` is complete, else why not (one line). Every file's
    presence and size is checked; with `checksums`, the sha256 of the files of `share` = (rank,
    world): every world-th file of the sorted list from the rank-th, as the save divides them."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in files.items()}
        digests = {name: str(entry["sha256"]) for name, entry in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted save, or saved before megatron-delta wrote manifests)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__}: {e})"
    for name, expected_size in sizes.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != expected_size:
            return f"{name} has {size} bytes, the save wrote {expected_size}"
    rank, world = share
    for name in sorted(digests)[rank::world] if checksums else ():
        if _sha256(os.path.join(directory, name)) != digests[name]:
            return f"{name} differs from what the save wrote (sha256 mismatch)"
    return None


def verify_together(directory: str) -> str | None:
    """verify() by every rank of the world at once, each rank checksumming a share of the files,
    so that a job reads the checkpoint once rather than once per rank. Every rank gets the same
    answer: the problem found by the lowest rank that found one."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    problems = [None] * world
    torch.distributed.all_gather_object(problems, verify(directory, share=(rank, world)))
    return next((problem for problem in problems if problem), None)


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint to start from


def saved_iterations(directory: str) -> list[tuple[int, str]]:
    """(iteration, path) of the iter_XXXXXXX directories in `directory`, newest first."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name))
             for name in names if (m := _ITERATION_DIR.fullmatch(name)) and os.path.isdir(os.path.join(directory, name))]
    return sorted(found, reverse=True)


def find_checkpoint(path: str) -> str | None:
    """The dist-checkpoint at `path`: `path` itself, or the one its `latest` names (None if neither)."""
    if dist_checkpointing.check_is_distributed_checkpoint(path):
        return path
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            latest = os.path.join(path, f.read().strip())
        if dist_checkpointing.check_is_distributed_checkpoint(latest):
            return latest
    return None


def _explicit_checkpoint(path: str, key: str, check, notes: list) -> str:
    """The checkpoint that checkpoint.resume / checkpoint.load names, verified by `check` if it has
    a manifest (a checkpoint from `convert import` or an older trainer has none: it is loaded as given)."""
    found = find_checkpoint(path)
    if found is None:
        raise RunConfigError(
            f"{key}={path!r} is neither a complete dist-checkpoint (metadata.json) nor a checkpoint "
            f"directory whose `latest` names one"
        )
    if os.path.isfile(os.path.join(found, MANIFEST)):
        problem = check(found)
        if problem:
            raise CheckpointError(f"{key}={path!r}: {found} is damaged: {problem}")
    else:
        notes.append(f"note: {found} has no {MANIFEST}; loading it without a completeness check")
    return found


def _newest_complete(directory: str, check, notes: list) -> str | None:
    """--resume auto: the newest checkpoint in the run's directory that `check` finds complete,
    noting each newer one skipped. None if the directory holds no checkpoint at all;
    CheckpointError if it holds some but none is complete (starting over would train from step 0
    and overwrite them)."""
    skipped = []
    for _, path in saved_iterations(directory):
        problem = check(path)
        if problem is None:
            for name, why in skipped:
                notes.append(f"--resume auto: skipped {name} ({why}); resuming from {os.path.basename(path)}, and "
                             f"saving step {int(name[5:])} again will replace it")
            return path
        skipped.append((os.path.basename(path), problem))
    if skipped:
        raise CheckpointError(
            f"--resume auto: no complete checkpoint in {directory}: "
            + "; ".join(f"{name}: {why}" for name, why in skipped)
            + ". Resume from one explicitly (--resume PATH, for one without a manifest), or move them away to start over"
        )
    notes.append(f"--resume auto: no checkpoint in {directory} yet; starting from step 0")
    return None


def starting_point(cfg: RunConfig, allowed_changes=(), together: bool = False) -> tuple[str | None, bool, list[str]]:
    """(checkpoint to start from or None, weights only?, notes to print): checkpoint.resume (auto:
    the run's newest complete checkpoint, if any), else checkpoint.load. The checkpoint's saved run
    config must match `cfg` (config_changes).

    The trainer asks twice. First each rank on its own, before any process group starts, checking
    the manifests' files by size only: a bad config or a missing checkpoint fails before the job
    has cost anything. Then every rank `together`, with the checksums, each rank reading a share
    of the files (verify_together): all ranks decide on the same checkpoint, and a job reads it
    once instead of once per rank."""
    check = verify_together if together else functools.partial(verify, checksums=False)
    ck, notes = cfg.checkpoint, []
    path, weights_only, resuming = None, False, True
    if ck.resume == "auto":
        path = _newest_complete(cfg.checkpoint_dir, check, notes)
    elif ck.resume is not None:
        path = _explicit_checkpoint(ck.resume, "checkpoint.resume", check, notes)
    if path is None and ck.load is not None:
        path, weights_only, resuming = _explicit_checkpoint(ck.load, "checkpoint.load", check, notes), ck.finetune, False
    if path is not None:
        check_config(path, cfg, allowed_changes, resuming)
    return path, weights_only, notes


# ---------------------------------------------------------------------------------------------
# The saved config against the requested one

# Fields that change neither the model nor what it computes: how the work is laid out, evaluated,
# cached and logged. Everything else of model / delta / training / data must match on resume.
LAYOUT_FIELDS = {
    "training.micro_batch_size", "training.recompute_granularity", "training.recompute_method",
    "training.recompute_num_layers", "training.eval_interval", "training.eval_iters",
    "data.cache_dir", "data.num_workers",
}
CHECKED_SECTIONS = ("model", "delta", "training", "data")


def _flat(cfg: RunConfig, sections) -> dict:
    return {f"{section}.{key}": value for section in sections
            for key, value in dataclasses.asdict(getattr(cfg, section)).items()}


def config_changes(saved: RunConfig, requested: RunConfig, sections=CHECKED_SECTIONS) -> list[str]:
    """`section.field: old -> new` for each computation-relevant field that differs."""
    old, new = _flat(saved, sections), _flat(requested, sections)
    return [f"{key}: {old[key]} -> {new[key]}" for key in old if key not in LAYOUT_FIELDS and old[key] != new[key]]


def check_allowed_changes(allowed) -> None:
    known = set(_flat(RunConfig(), CHECKED_SECTIONS)) - LAYOUT_FIELDS
    for field in allowed:
        if field not in known:
            raise RunConfigError(f"--allow-config-change {field}: not a model/delta/training/data field that resume "
                                 f"checks; use section.field, e.g. training.train_iters")


def check_config(path: str, cfg: RunConfig, allowed_changes, resuming: bool) -> None:
    """Refuse a checkpoint saved with another model (checkpoint.load) or, when resuming, with
    other model/delta/training/data settings, unless each change is in `allowed_changes`. The
    mesh (parallel section) may change: loading reshards."""
    saved_path = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(saved_path):  # e.g. `convert import` output: nothing recorded to compare
        return
    try:
        with open(saved_path, encoding="utf-8") as f:
            saved = from_dict(yaml.safe_load(f))
    except (yaml.YAMLError, RunConfigError, OSError) as e:
        raise CheckpointError(f"{saved_path}: cannot read the run config saved with the checkpoint: {e}") from None
    changes = config_changes(saved, cfg, CHECKED_SECTIONS if resuming else ("model", "delta"))
    refused = [change for change in changes if change.split(":")[0] not in allowed_changes]
    if refused:
        raise CheckpointError(
            f"{path} was saved with a different config: {'; '.join(refused)}. "
            + ("Pass --allow-config-change FIELD for each deliberate change" if resuming else
               "checkpoint.load needs the model and delta sections it was saved with")
        )


# ---------------------------------------------------------------------------------------------
# The trainer's checkpoints


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _chunk_keys(model: list) -> list:
    """Megatron-LM's checkpoint keys: "model", or "model0", "model1", ... per virtual stage. The
    tensors inside carry global layer numbers, so any mesh can load any other's checkpoint."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


@contextlib.contextmanager
def params_gathered(model: list, overlap_param_gather: bool):
    """With overlap_param_gather the distributed optimizer leaves the updated parameters to be
    all-gathered by forward pre-hooks; a checkpoint needs them gathered now."""
    if overlap_param_gather:
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if overlap_param_gather:
            for chunk in model:
                chunk.enable_forward_pre_hook()


def _write_results_in_process() -> None:
    """The torch_dist writer hands each rank's write results over a module-level queue that it
    creates on first use as a multiprocessing Manager queue: a server process that outlives a
    SIGKILLed trainer (reparented to init, holding its files open). Our saves are synchronous
    (the writer runs in this process), so a plain in-process queue serves (megatron-core 0.16
    and 0.19 both keep it in `_results_queue`)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


class Checkpointer:
    """dist_checkpointing checkpoints in <dir>/iter_XXXXXXX/ with a `latest` pointer.

    A save is written to iter_XXXXXXX.tmp, checksummed into manifest.json when every rank has
    finished, renamed, and only then named in `latest` (written to a temporary file and renamed):
    an interrupted save never replaces the last good checkpoint. With checkpoint.keep_last N, the
    complete checkpoints older than the newest N are deleted after each save. Contents: each
    model chunk's sharded_state_dict, the optimizer's sharded_state_dict, scheduler, per-rank RNG
    states, iteration, consumed samples and the mesh; the resolved run config is saved beside
    them as run_config.yaml. Loading on another mesh reshards (RNG states are then left as seeded).
    """

    def __init__(self, cfg: RunConfig, model: list, optimizer, scheduler, say=print):
        self.cfg = cfg
        self.dir = cfg.checkpoint_dir
        self.model = model
        self.chunks = {key: unwrap_model(chunk) for key, chunk in zip(_chunk_keys(model), model)}
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.say = say
        self.mesh = {
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "vpp": cfg.parallel.virtual_pipeline_model_parallel_size,
        }
        self.last_saved_iteration = None

    def _model_state(self) -> dict:
        return {key: chunk.sharded_state_dict() for key, chunk in self.chunks.items()}

    def _load_model(self, loaded: dict) -> None:
        for key, chunk in self.chunks.items():
            chunk.load_state_dict(loaded[key])

    def _sharded_state_dict(self, is_loading: bool, with_rng: bool) -> dict:
        state = self._model_state()
        state["optimizer"] = self.optimizer.sharded_state_dict(
            dict(state),
            is_loading=is_loading,
            metadata={
                "distrib_optim_sharding_type": self.cfg.checkpoint.distributed_optimizer_format,
                "chained_optim_avoid_prefix": True,
            },
        )
        if with_rng:
            state["rng_state"] = ShardedObject(
                "rng_state",
                _rng_state(),
                (self.mesh["pp"], self.mesh["tp"], self.mesh["dp"]),
                (
                    parallel_state.get_pipeline_model_parallel_rank(),
                    parallel_state.get_tensor_model_parallel_rank(),
                    parallel_state.get_data_parallel_rank(),
                ),
                replica_id=0,
            )
        return state

    def save(self, iteration: int, consumed_samples: int) -> str | None:
        """Save unless this iteration already is; returns the checkpoint directory written."""
        if self.last_saved_iteration == iteration:
            return None
        name = f"iter_{iteration:07d}"
        final, tmp = os.path.join(self.dir, name), os.path.join(self.dir, f"{name}.tmp")
        rank0 = torch.distributed.get_rank() == 0
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
            os.makedirs(tmp)
        torch.distributed.barrier()
        with params_gathered(self.model, self.cfg.parallel.overlap_param_gather):
            state = self._sharded_state_dict(is_loading=False, with_rng=True)
        state.update(
            scheduler=self.scheduler.state_dict(),
            iteration=iteration,
            consumed_train_samples=consumed_samples,
            mesh=self.mesh,
        )
        _write_results_in_process()
        dist_checkpointing.save(state, tmp)  # ends with a barrier over all ranks
        if rank0:
            write_atomically(os.path.join(tmp, RUN_CONFIG), self.cfg.to_yaml())
        self._write_manifest(tmp)
        if rank0:
            # A run resumed from an older checkpoint may reach an iteration saved before: keep
            # that copy until the new one is in place, and say so.
            replaced = f"{final}.replaced"
            if os.path.exists(final):
                self.say(f"note: replacing {final}, saved before by an earlier run")
                os.rename(final, replaced)
            os.rename(tmp, final)
            write_atomically(os.path.join(self.dir, LATEST), name)
            shutil.rmtree(replaced, ignore_errors=True)
            self._delete_old()
        torch.distributed.barrier()
        self.last_saved_iteration = iteration
        return final

    def _write_manifest(self, directory: str) -> None:
        """Every rank checksums a share of the files (on a shared file system), rank 0 writes."""
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        torch.distributed.barrier()  # run_config.yaml is written
        names = [_checkpoint_files(directory) if rank == 0 else None]
        torch.distributed.broadcast_object_list(names, src=0)
        shares = [None] * world
        torch.distributed.all_gather_object(shares, describe_files(directory, names[0][rank::world]))
        if rank == 0:
            write_manifest(directory, dict(sorted(item for share in shares for item in share.items())))

    def _delete_old(self) -> None:
        """checkpoint.keep_last: delete complete checkpoints older than the newest N complete ones
        (incomplete ones are left for inspection). Completeness is checked by size here, not
        checksum: the newest one was just checksummed, and re-reading every kept checkpoint at
        each save would cost as much I/O as the save."""
        keep = self.cfg.checkpoint.keep_last
        if keep is None:
            return
        complete = [path for _, path in saved_iterations(self.dir) if verify(path, checksums=False) is None]
        for path in complete[keep:]:
            shutil.rmtree(path)
            self.say(f"deleted {path} (checkpoint.keep_last={keep})")

    def load(self, path: str, weights_only: bool) -> tuple[int, int]:
        """Restore from `path`; returns (iteration, consumed samples) to continue from."""
        if weights_only:
            self._load_model(load(self._model_state(), path))
            # fp32 main copies of bf16/fp16 weights were taken when the optimizer was built.
            self.optimizer.reload_model_params()
            return 0, 0
        common = load_common_state_dict(path)
        same_mesh = common["mesh"] == self.mesh
        loaded = load(self._sharded_state_dict(is_loading=True, with_rng=same_mesh), path)
        self._load_model(loaded)
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        if same_mesh:
            _set_rng_state(loaded["rng_state"])
        if os.path.realpath(os.path.dirname(os.path.normpath(path))) == os.path.realpath(self.dir):
            self.last_saved_iteration = common["iteration"]
        return common["iteration"], common["consumed_train_samples"]
