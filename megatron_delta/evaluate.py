"""`megatron-delta evaluate`: loss and perplexity of a checkpoint on an indexed dataset.

    megatron-delta evaluate --checkpoint runs/tiny_cpu/checkpoints --data-prefix data/corpus_text_document \\
        [--split valid --split-weights 969,30,1 --seq-length 256 --max-samples 1000]
    torchrun --nproc_per_node=2 -m megatron_delta.cli evaluate ...                 # TP=2

The dataset is read as training reads it (GPTDataset through BlendedMegatronDatasetBuilder, the
checkpoint's tokenizer, Megatron's loss mask), one epoch of the chosen split unless --max-samples.
The loss is the token mean of Megatron's per-token cross entropy over the padded vocabulary (what
training logs); perplexity is exp(loss). --split-weights 1 --split train evaluates the whole dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from megatron_delta import convert, mesh
from megatron_delta.data import DataConfig, build_datasets
from megatron_delta.generate import GenerateError, inference_run_config, loaded_checkpoint, run_command

SPLITS = ("train", "valid", "test")


@torch.no_grad()
def evaluate_loss(model, dataset, micro_batch_size: int, max_samples: int | None = None) -> dict:
    """{"loss", "perplexity", "tokens", "samples"} of `model` over the dataset's samples in order."""
    device = next(model.parameters()).device
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    loss_sum, tokens = 0.0, 0.0
    for first in range(0, count, micro_batch_size):
        samples = [dataset[i] for i in range(first, min(first + micro_batch_size, count))]

        def stacked(key, dtype):
            return torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device=device, dtype=dtype)

        labels, mask = stacked("labels", torch.long), stacked("loss_mask", torch.float64)
        mask_key = "attention_mask" if "attention_mask" in samples[0] else None
        per_token = model(stacked("tokens", torch.long), stacked("position_ids", torch.long),
                          stacked(mask_key, torch.bool) if mask_key else None, labels=labels)
        loss_sum += (per_token.double() * mask).sum().item()
        tokens += mask.sum().item()
    if tokens == 0:
        raise GenerateError("the evaluated samples hold no tokens with a loss (all masked)")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(tokens), "samples": count}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="megatron-delta evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="trainer checkpoint dir (with `latest`), an iter_XXXXXXX dir, or a `convert import` output")
    parser.add_argument("--data-prefix", required=True, nargs="+",
                        help="indexed dataset prefix(es) (PREFIX.bin/.idx), or a blend: W1 PREFIX1 W2 PREFIX2 ...")
    parser.add_argument("--split", choices=SPLITS, default="valid", help="which split to evaluate (default valid)")
    parser.add_argument("--split-weights", help="train,valid,test weights (default: the checkpoint run's data.split)")
    parser.add_argument("--seq-length", type=int, help="sequence length (default: the model's seq_length)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N sequences of the split")
    parser.add_argument("--seed", type=int, default=1234, help="GPTDataset's shuffle seed")
    parser.add_argument("--tokenizer-path", help="Hugging Face tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--output-json", help="also write the result to this file")
    return parser.parse_args(argv)


def evaluate_command(args) -> None:
    if args.micro_batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise GenerateError("--micro-batch-size and --max-samples must be >= 1")
    checkpoint = convert.resolve_checkpoint(args.checkpoint)
    record = convert.read_checkpoint_record(checkpoint)
    run = inference_run_config(record, checkpoint)
    split_weights = args.split_weights or (run.data.split if record.hf_config is None else "969,30,1")
    # The sequences are cut as training cuts them; the checkpoint's tokenizer (passed below) is the one used.
    data = DataConfig(blend=args.data_prefix, split=split_weights, cache_dir=run.data.cache_dir,
                      eod_mask_loss=run.data.eod_mask_loss, create_attention_mask=run.data.create_attention_mask)
    index = SPLITS.index(args.split)
    weights = data.split.split(",")
    if index >= len(weights) or float(weights[index]) == 0:
        raise GenerateError(f"--split {args.split}: --split-weights {data.split} gives it no data")
    seq_length = args.seq_length or run.model.seq_length
    with loaded_checkpoint(checkpoint, args.tokenizer_path) as loaded:
        dataset = build_datasets(data, loaded.tokenizer, seq_length, (None, None, None), args.seed)[index]  # one epoch
        result = {"checkpoint": checkpoint, "split": args.split, "seq_length": seq_length,
                  **evaluate_loss(loaded.model, dataset, args.micro_batch_size, args.max_samples)}
        printing = mesh.is_logging_rank()
    if printing:
        print(f"{args.split}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
              f"{result['tokens']} tokens in {result['samples']} sequences of {seq_length}")
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command("evaluate", lambda: evaluate_command(args))


if __name__ == "__main__":
    sys.exit(main())
