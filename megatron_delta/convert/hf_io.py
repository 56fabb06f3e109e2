"""The files of `megatron-delta convert`: Hugging Face directories (config.json, safetensors
weights, shards, tokenizer files) and Megatron dist-checkpoints (with the conversion record
conversion.json), read and written around the pure mapping of megatron_delta.convert.adapters.

import_hf: reads config.json and model.safetensors (or the shards listed in
    model.safetensors.index.json; nothing is downloaded, `transformers` is not needed), builds the
    model once in this process (TP=1, PP=1, fp32, CPU), copies the weights in and writes
    `dist_checkpointing.save({"model": model.sharded_state_dict()}, OUTPUT)`, the trainer's
    checkpoint layout. A dist-checkpoint holds global (unsharded, layer-stacked) tensors and is
    resharded when loaded, so any TP x PP x VPP (x EP) mesh loads it; the TP/PP/VPP arguments only
    check that the target layout can hold this model. The routing parameters start at
    init="identity": a zero gate on the routed term makes `delta` and `delta_block` compute exactly
    the Hugging Face model's logits (on the real vocabulary, see adapters). OUTPUT/conversion.json
    records the source config, the trainer's `model:` section and the `delta:` section.

export_hf: loads a checkpoint (one written by import, or a trainer checkpoint: iter_XXXXXXX/ or the
    checkpoint directory holding `latest`) into the same one-process model and writes a Hugging
    Face directory that transformers runs: the weights in HF layout and in the original dtype
    (sharded like save_pretrained above max_shard_size), the tokenizer and generation files, and
    config.json. A routed model's directory also holds our model code (megatron_delta/hf:
    configuration_delta.py, modeling_delta.py; torch + transformers only), which its config.json
    names in `auto_map`:

        model_type     delta_qwen3 / delta_llama / delta_qwen3_moe (unknown to transformers: loading
                       the directory without trust_remote_code=True fails instead of dropping the routing)
        delta          variant, num_blocks, init, norm_epsilon
        weights        + model.layers.{i}.{attention,mlp}_router.{query,key_norm_weight[,gate]} (fp32;
                       gate for init="identity") and model.final_router.* (replacement variants)

        AutoModelForCausalLM.from_pretrained(OUTPUT, trust_remote_code=True)

    The config of a model trained from scratch (no Hugging Face source) is derived from the
    trainer's model section (adapters.hf_config_from_model); its tokenizer files are
    data.tokenizer_path's, or the byte tokenizer's written as a Hugging Face tokenizer (ids = bytes,
    <eod> 256, <pad> 257). Importing an exported directory reads the routing back: export and
    import are exact inverses (the vocabulary-padding rows, no part of the HF model, are not exported
    and come back as zeros).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil

import torch

from megatron_delta import hf as hf_model_code
from megatron_delta import mesh
from megatron_delta.config import DeltaResidualConfig
from megatron_delta.convert.adapters import (
    ConvertError,
    WeightLayout,
    architecture,
    check_layout,
    delta_from_dict,
    delta_from_hf_config,
    hf_config_from_model,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf,
    routed_hf_config,
    routing_from_hf,
    routing_to_hf,
    transformer_config_from_hf,
)
from megatron_delta.parameters import is_routing_parameter
from megatron_delta.run_config import ModelConfig, RunConfig, RunConfigError, build_model_chunk

IMPORT_VARIANTS = ("standard", "delta", "delta_block")  # the variants with an identity init
CONVERSION_FILE = "conversion.json"  # written next to an imported dist-checkpoint
HF_INDEX = "model.safetensors.index.json"
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Hugging Face files


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConvertError(f"--hf-dir {hf_dir}: no config.json; point it at a local Hugging Face model directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_hf_weights(hf_dir: str) -> dict:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, HF_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConvertError(
            f"--hf-dir {hf_dir}: no model.safetensors or {HF_INDEX}; only safetensors checkpoints are read "
            f"(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(hf_dir, name)))
    return tensors


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 20KB")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * unit)


def write_hf_weights(tensors: dict, hf_dir: str, max_shard_size: str = "5GB") -> list:
    """save_pretrained's layout: model.safetensors, or model-0000i-of-0000n.safetensors shards of at
    most max_shard_size plus model.safetensors.index.json. Returns the files written."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(hf_dir, name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard},
    }
    with open(os.path.join(hf_dir, HF_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return names + [HF_INDEX]


# ---------------------------------------------------------------------------------------------
# The one-process model


def build_model(model: ModelConfig, delta: DeltaResidualConfig, config, seed: int = 1234,
                pre_process: bool = True, post_process: bool = True, vp_stage=None):
    """The DeltaGPTModel (chunk) that `model` + `delta` describe, as megatron_delta.train builds it
    (without the DDP / Float16Module wrappers)."""
    mesh.set_seeds(seed)
    return build_model_chunk(RunConfig(model=model, delta=delta), config, model.vocab_size, vp_stage=vp_stage,
                             backend="local", pre_process=pre_process, post_process=post_process)


def load_weights_into(module: torch.nn.Module, tensors: dict) -> None:
    """Copy `tensors` into the module's parameters; the names must be exactly its parameters, less
    any routing parameters (which then keep their initial values)."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(tensors) - {n for n in params if is_routing_parameter(n)})
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ConvertError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != params[name].shape:
                raise ConvertError(
                    f"{name}: shape {tuple(tensor.shape)} does not fit the model's {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


@contextlib.contextmanager
def _staged_output(path: str):
    """Yields an empty directory PATH.tmp that becomes `path` only if the block completes, so an
    interrupted conversion never leaves a checkpoint that looks complete."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConvertError(f"--output {path} exists and is not empty; choose a new directory")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        os.rmdir(path)  # empty (checked above)
    os.rename(tmp, path)


# ---------------------------------------------------------------------------------------------
# import / export


def import_hf(hf_dir: str, output: str, delta: DeltaResidualConfig | None = None, tensor_model_parallel_size: int = 1,
              pipeline_model_parallel_size: int = 1, virtual_pipeline_model_parallel_size: int | None = None,
              make_vocab_size_divisible_by: int = 128, seed: int = 1234) -> dict:
    """Hugging Face directory -> dist-checkpoint of a DeltaGPTModel at `output`. Returns the
    contents of output/conversion.json.

    `delta` defaults to the routing of an exported directory (config.json `delta`, whose
    parameters are then loaded too), else to delta_block with 4 blocks. Without saved routing the
    variant must have an identity init (standard, delta, delta_block with init="identity")."""
    hf_config = read_hf_config(hf_dir)
    saved_delta = delta_from_hf_config(hf_config)
    if saved_delta is not None:
        if delta is not None and delta != saved_delta:
            raise ConvertError(
                f"--hf-dir {hf_dir} holds routing parameters of {saved_delta}, not of the requested {delta}; "
                f"leave out --variant/--num-blocks to use the saved routing"
            )
        delta = saved_delta
    else:
        delta = delta or DeltaResidualConfig(variant="delta_block", num_blocks=4, init="identity")
        if delta.variant not in IMPORT_VARIANTS or (delta.routed and delta.init != "identity"):
            raise ConvertError(
                f"--variant {delta.variant} (init={delta.init!r}) cannot start from a pretrained model: only "
                f"{', '.join(IMPORT_VARIANTS)} with init='identity' compute the original model's logits"
            )
    model_cfg = model_config_from_hf(hf_config, make_vocab_size_divisible_by)
    check_layout(model_cfg, delta, tensor_model_parallel_size, pipeline_model_parallel_size,
                 virtual_pipeline_model_parallel_size)
    layout = WeightLayout.of(model_cfg, hf_config["vocab_size"])
    hf_weights = read_hf_weights(hf_dir)
    routing = routing_from_hf({name: hf_weights.pop(name) for name in list(hf_weights) if "_router." in name})
    state = {**hf_to_megatron(hf_weights, layout), **routing}

    from megatron.core import dist_checkpointing

    record = {
        "source": os.path.abspath(hf_dir),
        "model": dataclasses.asdict(model_cfg),
        "delta": dataclasses.asdict(delta),
        "hf_vocab_size": hf_config["vocab_size"],
        "checked_layout": {"tensor_model_parallel_size": tensor_model_parallel_size,
                           "pipeline_model_parallel_size": pipeline_model_parallel_size,
                           "virtual_pipeline_model_parallel_size": virtual_pipeline_model_parallel_size},
        "hf_config": hf_config,
    }
    with _staged_output(output) as tmp, mesh.one_process():
        model = build_model(model_cfg, delta, transformer_config_from_hf(
            hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by), seed=seed)
        load_weights_into(model, state)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, tmp)
        with open(os.path.join(tmp, CONVERSION_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return record


def resolve_checkpoint(path: str) -> str:
    """A dist-checkpoint directory, or a trainer checkpoint directory (its `latest` iteration).
    One the trainer saved has a manifest: its files must all be there, each with the size the
    save wrote (the checksums are the trainer's to check: reading a whole checkpoint, optimizer
    state included, on every rank would cost more than loading its weights)."""
    from megatron_delta.checkpointing import MANIFEST, find_checkpoint, verify

    found = find_checkpoint(path)
    if found is None:
        raise ConvertError(f"--checkpoint {path} is not a dist-checkpoint (no metadata.json) nor a directory with `latest`")
    if os.path.isfile(os.path.join(found, MANIFEST)) and (problem := verify(found, checksums=False)):
        raise ConvertError(f"--checkpoint {path}: {found} is incomplete: {problem}")
    return found


@dataclasses.dataclass
class CheckpointRecord:
    """What a checkpoint records about its model."""

    run: RunConfig | None  # a trainer checkpoint's run_config.yaml; an imported one's model + delta sections
    hf_config: dict | None = None  # imported: the source config.json
    source_dir: str | None = None  # imported: the Hugging Face directory it came from


def read_checkpoint_record(checkpoint: str) -> CheckpointRecord:
    """The conversion.json of an imported checkpoint, else the trainer's run_config.yaml beside it
    (an empty record if neither is there)."""
    conversion, run_config = os.path.join(checkpoint, CONVERSION_FILE), os.path.join(checkpoint, "run_config.yaml")
    if os.path.isfile(conversion):
        with open(conversion, encoding="utf-8") as f:
            record = json.load(f)
        try:
            model = ModelConfig(**record["model"])
        except TypeError as e:
            raise ConvertError(f"{conversion}: model section does not fit this version: {e}") from None
        run = RunConfig(model=model, delta=delta_from_dict(record["delta"], conversion))
        return CheckpointRecord(run, record["hf_config"], record.get("source"))
    if os.path.isfile(run_config):
        from megatron_delta.run_config import load_run_config

        try:
            return CheckpointRecord(load_run_config(run_config))
        except (RunConfigError, ValueError) as e:
            raise ConvertError(f"{run_config}: {e}") from None
    return CheckpointRecord(None)


def _hf_config_of_checkpoint(checkpoint: str, record: CheckpointRecord, hf_dir: str | None):
    """(config.json, directory holding its tokenizer / generation files or None, whether the
    export writes the byte tokenizer's files) for an export: --hf-dir, else the import record, else
    derived from a from-scratch run's model and tokenizer."""
    if hf_dir:
        return read_hf_config(hf_dir), hf_dir, False
    if record.hf_config is not None:
        source = record.source_dir if record.source_dir and os.path.isdir(record.source_dir) else None
        return record.hf_config, source, False
    if record.run is None:
        raise ConvertError(
            f"--checkpoint {checkpoint} records no model (no conversion.json or run_config.yaml); "
            f"pass --hf-dir of the original model"
        )
    from megatron_delta.data import DataError, build_tokenizer

    data = record.run.data
    try:
        tokenizer = build_tokenizer(data)
    except DataError as e:
        raise ConvertError(f"--checkpoint {checkpoint}: its tokenizer cannot be loaded: {e}") from None
    tokenizer_dir = data.tokenizer_path if data.tokenizer == "huggingface" else None
    return (hf_config_from_model(record.run.model, tokenizer.vocab_size, tokenizer.eod), tokenizer_dir,
            data.tokenizer == "byte")


def _is_side_file(name: str) -> bool:
    """Tokenizer, generation and config files of an HF directory: not weights, not our model code."""
    return not (name.endswith(HF_WEIGHT_SUFFIXES) or name.endswith(".index.json")
                or name in hf_model_code.MODEL_CODE_FILES)


def export_hf(checkpoint: str, output: str, hf_dir: str | None = None, delta: DeltaResidualConfig | None = None,
              dtype: str | None = None, max_shard_size: str = "5GB") -> list:
    """Checkpoint -> Hugging Face directory at `output`. Returns the files written.

    The HF config comes from `hf_dir` (also the source of tokenizer and generation files), the
    conversion record of an imported checkpoint, or a from-scratch run's model section; the
    routing variant from the checkpoint (conversion.json or the trainer's run_config.yaml), else
    from `delta`."""
    from megatron_delta import checkpointing

    checkpoint = resolve_checkpoint(checkpoint)
    record = read_checkpoint_record(checkpoint)
    recorded_delta = record.run.delta if record.run else None
    if recorded_delta is not None and delta is not None and delta != recorded_delta:
        raise ConvertError(f"--checkpoint {checkpoint} is a {recorded_delta} model, not {delta}; leave out --variant")
    delta = recorded_delta or delta
    if delta is None:
        raise ConvertError(f"--checkpoint {checkpoint} records no routing variant; pass --variant and --num-blocks")
    hf_config, files_dir, byte_tokenizer = _hf_config_of_checkpoint(checkpoint, record, hf_dir)
    model_cfg = model_config_from_hf(hf_config)
    recorded, derived = architecture(record.run.model) if record.run else {}, architecture(model_cfg)
    for field, value in recorded.items():
        if value != derived[field]:
            raise ConvertError(
                f"--checkpoint {checkpoint} has model.{field}={value!r} but the Hugging Face config gives "
                f"{derived[field]!r}; pass the --hf-dir this checkpoint was converted from"
            )
    embedding = checkpointing.load_tensors_metadata(checkpoint)["embedding.word_embeddings.weight"]
    model_cfg = dataclasses.replace(model_cfg, vocab_size=embedding.global_shape[0])  # the padded vocabulary
    layout = WeightLayout.of(model_cfg, hf_config["vocab_size"])
    dtype_name = dtype or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype_name not in DTYPES:
        raise ConvertError(f"--dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}")

    def own_copy(tensor, to_dtype):  # safetensors refuses views that share storage
        return tensor.to(dtype=to_dtype, memory_format=torch.contiguous_format, copy=True)

    with _staged_output(output) as tmp:
        with mesh.one_process():
            model = build_model(model_cfg, delta, transformer_config_from_hf(hf_config))
            loaded = checkpointing.load({"model": model.sharded_state_dict()}, checkpoint)
            model.load_state_dict(loaded["model"])
            state = {name: param.detach() for name, param in model.named_parameters()}
        hf_tensors = {name: own_copy(t, DTYPES[dtype_name]) for name, t in megatron_to_hf(state, layout).items()}
        # Routing parameters stay fp32 (the model keeps them in fp32 whatever its dtype).
        hf_tensors.update({name: own_copy(t, torch.float32) for name, t in routing_to_hf(state).items()})
        written = write_hf_weights(hf_tensors, tmp, max_shard_size)
        for name in sorted(os.listdir(files_dir)) if files_dir else ():
            if os.path.isfile(os.path.join(files_dir, name)) and _is_side_file(name):
                shutil.copy2(os.path.join(files_dir, name), tmp)
                written.append(name)
        if byte_tokenizer:
            from megatron_delta.data import write_hf_byte_tokenizer

            written += write_hf_byte_tokenizer(tmp)
        if delta.routed or "config.json" not in written:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(routed_hf_config(hf_config, delta) if delta.routed else hf_config, f, indent=2)
            written.append("config.json")
        if delta.routed:
            for name in hf_model_code.MODEL_CODE_FILES:
                shutil.copy2(os.path.join(hf_model_code.MODEL_CODE_DIR, name), tmp)
            written += hf_model_code.MODEL_CODE_FILES
    return sorted(set(written))
