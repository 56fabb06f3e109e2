"""`python -m megatron_delta.convert ...` = `megatron-delta convert ...` (through the CLI, which checks the
megatron-core release first)."""

import sys

from megatron_delta import cli

sys.exit(cli.main(["convert", *sys.argv[1:]]))
