"""Resuming checks a checkpoint's manifest with every rank reading a share of its files
(checkpointing.verify_together): each file is checksummed by exactly one rank, and a file altered
in any rank's share gives every rank the same answer."""

import os
import shutil
import tempfile

import torch

from megatron_delta import checkpointing

FILES = 10  # over 4 ranks: shares of 3, 3, 2, 2


def test_every_file_is_checksummed_once_and_every_rank_agrees(monkeypatch):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    directory = [None]
    if rank == 0:
        directory[0] = tempfile.mkdtemp()
        names = [f"__{i}_0.distcp" for i in range(FILES)]
        for i, name in enumerate(names):
            with open(os.path.join(directory[0], name), "wb") as f:
                f.write(torch.randint(0, 256, (1000 + i,), dtype=torch.uint8).numpy().tobytes())
        checkpointing.write_manifest(directory[0], checkpointing.describe_files(directory[0], names))
    torch.distributed.broadcast_object_list(directory, src=0)
    directory = directory[0]

    hashed = []  # the files this rank read to checksum them
    sha256 = checkpointing._sha256
    monkeypatch.setattr(checkpointing, "_sha256", lambda path: hashed.append(os.path.basename(path)) or sha256(path))
    try:
        assert checkpointing.verify_together(directory) is None
        shares = [None] * world
        torch.distributed.all_gather_object(shares, hashed)
        assert sorted(name for share in shares for name in share) == sorted(f"__{i}_0.distcp" for i in range(FILES))
        assert [len(share) for share in shares] == [3, 3, 2, 2]

        altered = shares[world - 1][0]  # only the last rank reads it
        torch.distributed.barrier()
        if rank == 0:
            with open(os.path.join(directory, altered), "r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 0xFF]))
        torch.distributed.barrier()
        problems = [None] * world
        torch.distributed.all_gather_object(problems, checkpointing.verify_together(directory))
        assert problems == [f"{altered} differs from what the save wrote (sha256 mismatch)"] * world
    finally:
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(directory)
