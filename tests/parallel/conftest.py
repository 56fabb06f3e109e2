"""One gloo world for the whole 4-rank session; each test builds and destroys its own
model-parallel groups (run_parity does both). The CPU shim comes from tests/conftest.py."""

import os

import pytest

from megatron_delta import mesh

WORLD_SIZE = 4


@pytest.fixture(scope="session", autouse=True)
def gloo_world():
    if os.environ.get("WORLD_SIZE") != str(WORLD_SIZE):
        pytest.exit(
            f"tests/parallel runs under `torchrun --nproc_per_node={WORLD_SIZE} -m pytest tests/parallel` "
            "(or via tests/test_parallel_suite.py)",
            returncode=2,
        )
    mesh.start_world()
    yield
    mesh.stop_world()
