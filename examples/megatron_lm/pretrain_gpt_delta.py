"""Megatron-LM's pretrain_gpt.py with delta residuals, without editing Megatron-LM (tags core_v0.16.1
and core_v0.19.0).

    PYTHONPATH=/path/to/Megatron-LM torchrun --nproc_per_node 8 \\
        examples/megatron_lm/pretrain_gpt_delta.py <any pretrain_gpt.py arguments> \\
        --delta-variant delta_block --delta-num-blocks 8 [--delta-init reference] \\
        [--delta-router-lr-mult 1.0]

Datasets, forward step, loss, checkpointing and logging are pretrain_gpt.py's own (imported from
it; its __main__ block does not run on import). What differs: the model is built by
megatron_delta.megatron_lm.delta_gpt_builder, and training.py's schedule lookup and optimizer
config are rebound by install_training_hooks() (see that module); pretrain_with_model_provider()
calls whichever of the two pretrain() APIs the Megatron-LM checkout has. On a machine without CUDA
(tests, laptops) the CPU shim lets the same training loop run on gloo.
"""

import time

_PROGRAM_START_TIME = time.time()

from functools import partial  # noqa: E402

import torch  # noqa: E402

import pretrain_gpt  # noqa: E402  (Megatron-LM's script, from PYTHONPATH)
from megatron.training import set_startup_timestamps  # noqa: E402
from model_provider import model_provider  # noqa: E402

from megatron_delta import megatron_lm  # noqa: E402


def add_args(parser):
    if pretrain_gpt.has_nvidia_modelopt:
        parser = pretrain_gpt.add_modelopt_args(parser)
    return megatron_lm.add_delta_args(parser)


def main():
    if not torch.cuda.is_available():
        from megatron_delta import cpu_shim

        cpu_shim.install_megatron_lm()
    megatron_lm.install_training_hooks()
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())

    # As in pretrain_gpt.py: datasets are built on the ranks that need them, then broadcast.
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    megatron_lm.pretrain_with_model_provider(
        pretrain_gpt.train_valid_test_datasets_provider,
        partial(model_provider, megatron_lm.delta_gpt_builder),
        pretrain_gpt.forward_step,
        extra_args_provider=add_args,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )


if __name__ == "__main__":
    main()
