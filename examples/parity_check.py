"""Check that a parallel layout computes what one process computes (loss and every gradient).

    torchrun --nproc_per_node=4 examples/parity_check.py --tp 2 --pp 2 --variant delta_block
    torchrun --nproc_per_node=4 examples/parity_check.py --pp 2 --vpp 2 --dist-opt --steps 3

Same as `megatron-delta parity ...`; see `--help`. Exits non-zero past the tolerance.
"""

import sys

from megatron_delta import cli

if __name__ == "__main__":
    sys.exit(cli.main(["parity", *sys.argv[1:]]))
