"""Run by tests/test_data.py under torchrun (gloo): every rank builds the demo corpus and the GPT
datasets at the same moment into one fresh cache directory, then the ranks compare what they read.

usage: torchrun --standalone --nproc_per_node=N build_datasets_dist.py CACHE_DIR
Prints `rank R digest D` per rank.
"""

import hashlib
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from megatron_delta import mesh  # noqa: E402
from megatron_delta.data import DataConfig, build_datasets, build_tokenizer  # noqa: E402

SEQ_LENGTH, NUM_SAMPLES, SEED = 32, (40, 8, 8), 5


def samples_digest(datasets) -> str:
    """A fingerprint of the first 8 samples of every split."""
    tokens = [dataset[i]["tokens"].numpy().tobytes() for dataset in datasets for i in range(8)]
    return hashlib.sha256(b"".join(tokens)).hexdigest()[:16]


def main(cache_dir: str) -> None:
    mesh.start_world()
    cfg = DataConfig(cache_dir=cache_dir)
    datasets = build_datasets(cfg, build_tokenizer(cfg), SEQ_LENGTH, NUM_SAMPLES, SEED)
    # one write per line: the ranks share torchrun's stdout
    sys.stdout.write(f"rank {torch.distributed.get_rank()} digest {samples_digest(datasets)}\n")
    sys.stdout.flush()
    torch.distributed.barrier()
    mesh.stop_world()


if __name__ == "__main__":
    main(sys.argv[1])
