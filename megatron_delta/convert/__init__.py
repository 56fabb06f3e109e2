"""Hugging Face <-> Megatron conversion (`megatron-delta convert import/export`), in three parts:

    adapters   the pure mapping: HF config <-> the trainer's model section, HF <-> Megatron state
               dicts, one adapter per model family (Llama, Qwen3, Qwen3-MoE); no files, no processes
    hf_io      the files: safetensors weights and shards, config.json, the conversion record, the
               one-process model that reads and writes dist-checkpoints; import_hf and export_hf
    command    the command line (argparse, then hf_io)

The names below are the package's interface (generate, evaluate and the tests use them).
"""

from megatron_delta.convert.adapters import (
    ConvertError,
    WeightLayout,
    architecture,
    check_layout,
    hf_config_from_model,
    hf_to_megatron,
    interleave_qkv,
    megatron_to_hf,
    model_config_from_hf,
    routed_hf_config,
    split_qkv,
    transformer_config_from_hf,
)
from megatron_delta.convert.command import main
from megatron_delta.convert.hf_io import (
    CONVERSION_FILE,
    HF_INDEX,
    IMPORT_VARIANTS,
    CheckpointRecord,
    build_model,
    export_hf,
    import_hf,
    load_weights_into,
    read_checkpoint_record,
    read_hf_config,
    read_hf_weights,
    resolve_checkpoint,
)

__all__ = [
    "CONVERSION_FILE",
    "HF_INDEX",
    "IMPORT_VARIANTS",
    "CheckpointRecord",
    "ConvertError",
    "WeightLayout",
    "architecture",
    "build_model",
    "check_layout",
    "export_hf",
    "hf_config_from_model",
    "hf_to_megatron",
    "import_hf",
    "interleave_qkv",
    "load_weights_into",
    "main",
    "megatron_to_hf",
    "model_config_from_hf",
    "read_checkpoint_record",
    "read_hf_config",
    "read_hf_weights",
    "resolve_checkpoint",
    "routed_hf_config",
    "split_qkv",
    "transformer_config_from_hf",
]
