"""Validation during training: the token-mean loss over the first eval_iters global batches of
the validation split (the same held-out samples at every evaluation), over all ranks."""

from __future__ import annotations

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_delta.metrics import token_mean


class Evaluator:
    def __init__(self, run_schedule, model: list, batch_source, eval_iters: int, device: torch.device):
        self.run_schedule = run_schedule  # (micro-batches, forward_only) -> this rank's [loss sum, tokens]
        self.model = model
        self.batch_source = batch_source
        self.eval_iters = eval_iters
        self.device = device

    @torch.no_grad()
    def __call__(self) -> float:
        for chunk in self.model:
            chunk.eval()
        batches = self.batch_source.batches(first_sample=0)
        total = torch.zeros(2, device=self.device)
        for _ in range(self.eval_iters):
            total += self.run_schedule([next(batches) for _ in range(get_num_microbatches())], forward_only=True)
        for chunk in self.model:
            chunk.train()
        return token_mean(total)
