"""`megatron-delta generate`: text from a trainer or converted checkpoint, with Megatron's KV cache.

    megatron-delta generate --checkpoint runs/tiny_cpu/checkpoints --prompt "def " --max-new-tokens 64
    megatron-delta generate --checkpoint CKPT --prompts-file prompts.txt --temperature 0.8 --top-p 0.95 --seed 1
    torchrun --nproc_per_node=2 -m megatron_delta.cli generate --checkpoint CKPT --prompt "def "   # TP=2

The checkpoint is a trainer checkpoint (its run_config.yaml gives model, routing and tokenizer) or
one written by `convert import` (conversion.json; the tokenizer is the source directory's, or
--tokenizer-path). It loads resharded onto tensor parallelism over every launched process.

The KV cache is Megatron-Core's StaticInferenceContext, used as Megatron's static-batch text
generation does: one prefill over the shortest prompt of the batch, then one token per step;
while a longer prompt is still being read its own next token is forced. A sequence stops at the
tokenizer's end-of-document token. Depth routing mixes no positions, so each new token routes
over its own sources: nothing routing-specific is cached. Temperature 0 is greedy; otherwise
the logits are divided by the temperature and cut to the top k and to the nucleus top p. The
loop is ours rather than Megatron's TextGenerationController because that controller's
static-batch loop records torch.cuda.Event timings every step (no CPU fallback), its engine first
builds the CUDA-only dynamic engine, and its interface changed between megatron-core 0.16 and 0.19.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import torch

from megatron_delta import convert, mesh
from megatron_delta.checkpointing import CheckpointError
from megatron_delta.data import DataError, build_tokenizer, load_tokenizer
from megatron_delta.run_config import ParallelConfig, RunConfig, RunConfigError, build_transformer_config


class GenerateError(ValueError):
    """A checkpoint, prompt or option generation cannot use; the message names it and the fix."""


# What a command reports as one line (exit status 2) instead of a traceback.
USER_ERRORS = (GenerateError, convert.ConvertError, CheckpointError, RunConfigError, DataError, OSError)


# ---------------------------------------------------------------------------------------------
# Checkpoint -> model on this rank's tensor-parallel slice


def inference_run_config(record: convert.CheckpointRecord, checkpoint: str) -> RunConfig:
    """The checkpoint's run config on a TP-only mesh over every launched process (PP=1, DP=1)."""
    if record.run is None:
        raise GenerateError(
            f"--checkpoint {checkpoint} records no model: expected the trainer's run_config.yaml or the "
            f"conversion.json of `megatron-delta convert import` next to its metadata.json"
        )
    tp = int(os.environ.get("WORLD_SIZE", 1))
    run = dataclasses.replace(record.run, parallel=ParallelConfig(tensor_model_parallel_size=tp))
    run.validate(world_size=tp)  # heads, query groups, ... divisible by the TP size, named if not
    return run


def load_model_for_inference(checkpoint: str, cfg: RunConfig, config):
    """The DeltaGPTModel of `cfg`, this rank's slice, with the checkpoint's weights, in eval mode
    (dist_checkpointing reshards whatever mesh wrote it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_delta import checkpointing
    from megatron_delta.run_config import build_model_chunk

    # The padded vocabulary the checkpoint holds (it can differ from what this TP size would pad to).
    embedding = checkpointing.load_tensors_metadata(checkpoint).get("embedding.word_embeddings.weight")
    if embedding is None:
        raise GenerateError(f"--checkpoint {checkpoint} holds no GPT model (no embedding.word_embeddings.weight)")
    model = build_model_chunk(cfg, config, embedding.global_shape[0], pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    try:  # the safe reader (checkpointing.load): Megatron's own checks are CheckpointErrors
        loaded = checkpointing.load({"model": model.sharded_state_dict()}, checkpoint)
    except CheckpointException as e:  # torch's shape checks, raised inside its load
        reason = next(iter(e.failures.values()))[0]
        raise GenerateError(
            f"--checkpoint {checkpoint}: its weights do not fit the model its run config describes ({reason})"
        ) from None
    model.load_state_dict(loaded["model"])
    return model.eval()


def checkpoint_tokenizer(record: convert.CheckpointRecord, checkpoint: str, tokenizer_path: str | None = None):
    """--tokenizer-path, else the trainer's data.tokenizer, else an imported model's source directory."""
    try:
        if tokenizer_path:
            return load_tokenizer("huggingface", tokenizer_path)
        if record.hf_config is None:
            return build_tokenizer(record.run.data)
        if record.source_dir and os.path.isdir(record.source_dir) and any(
                os.path.exists(os.path.join(record.source_dir, name))
                for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return load_tokenizer("huggingface", record.source_dir)
    except DataError as e:
        raise GenerateError(f"--checkpoint {checkpoint}: {e}") from None
    raise GenerateError(
        f"--checkpoint {checkpoint} was imported from {record.source_dir}, which holds no tokenizer files; "
        f"pass --tokenizer-path DIR"
    )


@dataclasses.dataclass
class LoadedCheckpoint:
    path: str  # the resolved dist-checkpoint
    record: convert.CheckpointRecord
    cfg: RunConfig  # on the inference mesh
    tokenizer: object
    model: torch.nn.Module


@contextlib.contextmanager
def loaded_checkpoint(path: str, tokenizer_path: str | None = None):
    """The checkpoint's model (this rank's TP slice, eval mode) and tokenizer, on a TP-only mesh
    over the launched processes (one process without torchrun); the mesh is torn down on exit.
    Nothing starts before the checkpoint, its record and its tokenizer are known to be usable."""
    checkpoint = convert.resolve_checkpoint(path)
    record = convert.read_checkpoint_record(checkpoint)
    cfg = inference_run_config(record, checkpoint)
    tokenizer = checkpoint_tokenizer(record, checkpoint, tokenizer_path)
    config = build_transformer_config(cfg, torch.cuda.is_available())
    with mesh.session(cfg.parallel):
        mesh.set_seeds(cfg.training.seed)  # Megatron's TP weight init needs its RNG streams; the weights are loaded
        yield LoadedCheckpoint(checkpoint, record, cfg, tokenizer, load_model_for_inference(checkpoint, cfg, config))


def run_command(command: str, body) -> int:
    """body(); 0, or 2 (bad input, as every command) after one `megatron-delta COMMAND: error: ...`
    line for a user error."""
    try:
        body()
    except USER_ERRORS as e:
        print(f"megatron-delta {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# Sampling and the generation loop


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (top_k, top_p unused); top_k 0 and top_p 1: no cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerateError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise GenerateError(f"--top-k {self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"--top-p {self.top_p}: must be in (0, 1] (1 keeps every token)")

    def sample(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Next token ids [batch] from last-position logits [batch, vocab]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            # Drop a token when the more likely ones already cover top_p (the most likely always stays).
            ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= self.top_p, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model, prompts: list, max_new_tokens: int, sampling: Sampling, vocab_size: int,
                    eod: int | None = None, use_cache: bool = True) -> list:
    """The continuation token ids of each prompt (lists of ids), up to max_new_tokens or `eod`
    (not included). vocab_size: the tokenizer's; the padded vocabulary's extra ids are never
    sampled. use_cache=False recomputes the whole sequence every step (the reference the KV-cache
    path is tested against)."""
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    if not prompts or min(map(len, prompts)) == 0:
        raise GenerateError("every prompt needs at least one token")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + max_new_tokens
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(prompt)
    context = StaticInferenceContext(len(prompts), total) if use_cache else None
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    ends = lengths + max_new_tokens
    start = 0
    for end in range(int(lengths.min()), total):
        window = slice(start, end) if use_cache else slice(0, end)
        positions = torch.arange(window.start, end, device=device).expand(len(prompts), -1)
        logits = model(tokens[:, window], positions, None, inference_context=context, runtime_gather_output=True)
        if use_cache:
            context.sequence_len_offset += end - start
            context.enable_decode_mode()
            start = end
        chosen = sampling.sample(logits[:, -1, :vocab_size], generator)
        # Every TP rank holds the same gathered logits and generator; rank 0's choice is made
        # everyone's so that the ranks cannot drift apart.
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(chosen, parallel_state.get_tensor_model_parallel_src_rank(),
                                        group=parallel_state.get_tensor_model_parallel_group())
        reading_prompt = end < lengths
        tokens[:, end] = torch.where(reading_prompt, tokens[:, end], chosen)
        finished |= ~reading_prompt & ((chosen == eod) if eod is not None else False)
        finished |= end + 1 >= ends
        if finished.all():
            break
    out = []
    for i, length in enumerate(lengths.tolist()):
        continuation = tokens[i, length: min(end + 1, length + max_new_tokens)].tolist()
        out.append(continuation[: continuation.index(eod)] if eod in continuation else continuation)
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def read_prompts(args) -> list:
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompts_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except OSError as e:
        raise GenerateError(f"--prompts-file: {e}") from None
    if args.prompts_file.endswith(".jsonl"):
        try:
            prompts = [json.loads(line)["prompt"] for line in lines if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GenerateError(f"--prompts-file {args.prompts_file}: every line must be {{\"prompt\": \"...\"}} ({e})") from None
    else:
        prompts = [line for line in lines if line]
    if not prompts:
        raise GenerateError(f"--prompts-file {args.prompts_file} holds no prompts")
    return prompts


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="megatron-delta generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="trainer checkpoint dir (with `latest`), an iter_XXXXXXX dir, or a `convert import` output")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--prompts-file", help="one prompt per line (.jsonl: {\"prompt\": ...} per line)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the nucleus of mass p (1: all)")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--tokenizer-path", help="Hugging Face tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    return parser.parse_args(argv)


def generate_command(args) -> None:
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise GenerateError("--max-new-tokens and --batch-size must be >= 1")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    prompts = read_prompts(args)
    with loaded_checkpoint(args.checkpoint, args.tokenizer_path) as loaded:
        tokenizer = loaded.tokenizer
        results = []
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first: first + args.batch_size]
            ids = generate_tokens(loaded.model, [tokenizer.tokenize(p) for p in batch], args.max_new_tokens,
                                  sampling, tokenizer.vocab_size, getattr(tokenizer, "eod", None),
                                  use_cache=not args.no_kv_cache)
            results += [(p, tokenizer.detokenize(continuation)) for p, continuation in zip(batch, ids)]
        printing = mesh.is_logging_rank()
    for prompt, completion in results if printing else ():
        if args.prompt is not None:
            print(prompt + completion)
        else:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command("generate", lambda: generate_command(args))


if __name__ == "__main__":
    sys.exit(main())
