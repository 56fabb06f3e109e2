"""`megatron-delta convert`: Hugging Face Qwen3 / Llama / Qwen3-MoE checkpoints <-> Megatron
dist-checkpoints of a DeltaGPTModel.

    megatron-delta convert import --hf-dir Qwen3-0.6B --output ckpt/qwen3-0.6b-delta-block \\
        --variant delta_block --num-blocks 4 [--tp 2 --pp 2]
    megatron-delta convert export --checkpoint runs/ft/checkpoints --output qwen3-0.6b-delta-block-hf \\
        [--hf-dir Qwen3-0.6B]

The argument parsing only: the files are megatron_delta.convert.hf_io's (import_hf, export_hf), the
mapping megatron_delta.convert.adapters'.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml

from megatron_delta.config import DeltaConfigError, DeltaResidualConfig
from megatron_delta.convert.adapters import ConvertError
from megatron_delta.convert.hf_io import CONVERSION_FILE, DTYPES, IMPORT_VARIANTS, export_hf, import_hf
from megatron_delta.run_config import RunConfigError


def _delta_from_args(args):
    if args.variant is None:
        return None
    try:
        # import starts the identity variants at identity; anything else keeps the paper's init
        # (and import then refuses it: it would not compute the original model).
        identity = args.command == "import" and args.variant in IMPORT_VARIANTS
        return DeltaResidualConfig(variant=args.variant, num_blocks=args.num_blocks,
                                   init=args.init or ("identity" if identity else "reference"))
    except DeltaConfigError as e:
        raise ConvertError(str(e)) from None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="megatron-delta convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="Hugging Face directory -> Megatron dist-checkpoint")
    imp.add_argument("--hf-dir", required=True, help="local HF model directory (config.json + safetensors)")
    imp.add_argument("--output", required=True, help="new directory for the dist-checkpoint")
    imp.add_argument("--variant", choices=IMPORT_VARIANTS + ("attnres_block", "attnres_full"),
                     help="routing variant (default: the HF directory's config.json delta, else delta_block)")
    imp.add_argument("--num-blocks", type=int, default=4, help="blocks of the block variants (default 4)")
    imp.add_argument("--init", choices=("identity", "reference"), help=argparse.SUPPRESS)
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the model against")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against")
    imp.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages to check the model against")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary with zero rows to a multiple of this (default 128; 1: no padding)")
    imp.add_argument("--seed", type=int, default=1234, help="seed of the routing queries' initialisation")
    exp = commands.add_parser("export", help="Megatron dist-checkpoint -> Hugging Face model directory")
    exp.add_argument("--checkpoint", required=True,
                     help="dist-checkpoint (import output or iter_XXXXXXX) or a trainer checkpoint dir with `latest`")
    exp.add_argument("--output", required=True, help="new directory for the Hugging Face model")
    exp.add_argument("--hf-dir", help="the original HF model (config, tokenizer); default: the import record")
    exp.add_argument("--variant", help="routing variant, if the checkpoint does not record it")
    exp.add_argument("--num-blocks", type=int, default=4)
    exp.add_argument("--init", choices=("identity", "reference"), help="with --variant: the routing init "
                     "(identity checkpoints have gates)")
    exp.add_argument("--dtype", choices=tuple(DTYPES), help="weights dtype (default: config.json's dtype)")
    exp.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # many intra-op threads are slower on small CPU hosts
    from megatron_delta.checkpointing import CheckpointError
    from megatron_delta.mesh import MeshError

    try:
        if args.command == "import":
            record = import_hf(args.hf_dir, args.output, _delta_from_args(args), args.tp, args.pp, args.vpp,
                               args.make_vocab_size_divisible_by, args.seed)
            model = record["model"]
            print(f"wrote {args.output}: {record['delta']['variant']} model, {model['num_layers']} layers, "
                  f"vocabulary {record['hf_vocab_size']} padded to {model['vocab_size']}; loads on any TP/PP "
                  f"mesh (checked: tp {args.tp} pp {args.pp}{f' vpp {args.vpp}' if args.vpp else ''}).\n"
                  f"Fine-tune with checkpoint.load: {args.output}, checkpoint.finetune: true and this model "
                  f"section (also in {os.path.join(args.output, CONVERSION_FILE)}):")
            print(yaml.safe_dump({"model": model, "delta": record["delta"]}, sort_keys=False), end="")
        else:
            written = export_hf(args.checkpoint, args.output, args.hf_dir, _delta_from_args(args), args.dtype,
                                args.max_shard_size)
            print(f"wrote {args.output}: {', '.join(written)}")
    except (ConvertError, RunConfigError, OSError, CheckpointError, MeshError) as e:
        print(f"megatron-delta convert: error: {e}", file=sys.stderr)
        return 2
    return 0

