"""`megatron-delta <command>`: one entry point, one module per command."""

import importlib
import sys

# command -> (module, one-line help). Each module has `main(argv) -> int`.
COMMANDS = {
    "train": ("megatron_delta.train", "pre-train or fine-tune from a YAML config"),
    "preprocess": ("megatron_delta.data", "text / JSONL -> Megatron indexed dataset (.bin/.idx)"),
    "plot-routing": ("megatron_delta.routing_plot", "routing heatmap + sharpness curve of a run"),
    "plan": ("megatron_delta.plan", "per-rank memory / traffic plan for a parallel layout"),
    "convert": ("megatron_delta.convert", "Hugging Face <-> Megatron dist-checkpoint conversion"),
    "parity": ("megatron_delta.parity", "compare a parallel mesh against one process"),
    "generate": ("megatron_delta.generate", "text from a checkpoint (Megatron KV cache; greedy or sampled)"),
    "evaluate": ("megatron_delta.evaluate", "loss and perplexity of a checkpoint on an indexed dataset"),
    "compare": ("megatron_delta.compare", "variants x seeds ablation with intervals, plots and a report"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: megatron-delta <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    from megatron_delta import compat

    try:
        compat.check_supported()
    except compat.UnsupportedMegatronCore as error:
        print(f"megatron-delta: error: {error}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
