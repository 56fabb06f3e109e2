"""What the trainer logs about mixture-of-experts layers: the router's auxiliary losses (from
Megatron's aux-loss tracker, reduced the way Megatron's own logging reduces them) and the share
of routed tokens each expert received.

The MoE layers themselves are Megatron's (MoELayer from the GPT decoder block spec, see
model.get_gpt_delta_decoder_block_spec); depth routing only changes what they read.

    monitor = MoEMonitor(config, model_chunks)          # config.num_moe_experts must be set
    with monitor.step(collect=log_now, num_microbatches=n):
        forward_backward(...)
    monitor.last   # {"moe_load_balancing_loss": ..., "moe_expert_load_max": ..., "expert_load": {...}}
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_delta import compat

# Megatron's tracker name for each moe_router_load_balancing_type.
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}


class MoEMonitor:
    """Per training step: clears Megatron's aux-loss tracker (as Megatron's loop does), and on
    logging steps reads the aux losses and counts the tokens routed to each expert."""

    def __init__(self, config, model_chunks):
        self.config = config
        self.routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        balancing = config.moe_router_load_balancing_type
        balancing = balancing if isinstance(balancing, list) else [balancing]
        self.loss_names = [_AUX_LOSS_NAMES[t] for t in balancing if t in _AUX_LOSS_NAMES]
        if config.moe_z_loss_coeff:
            self.loss_names.append("z_loss")
        self.num_layers = config.num_layers + (config.mtp_num_layers or 0)
        self.last = {}

    @contextlib.contextmanager
    def step(self, collect: bool, num_microbatches: int):
        """Wrap one step's schedule. collect: a logging step (the same on every rank: the summary
        is collective)."""
        counts = torch.zeros(self.num_layers, self.config.num_moe_experts, dtype=torch.float64)
        hooks = [router.register_forward_hook(self._counter(counts)) for router in self.routers] if collect else []
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        if collect:
            self.last = self._summary(counts, num_microbatches)
        compat.clear_moe_aux_losses()

    @staticmethod
    def _counter(counts):
        def count(router, inputs, outputs):
            routing_map = outputs[1]  # [tokens, experts] bool: the experts each token goes to
            counts[router.layer_number - 1] += routing_map.sum(0).detach().to("cpu", torch.float64)
        return count

    def _summary(self, counts, num_microbatches: int) -> dict:
        """Aux losses as Megatron logs them (per micro-batch, mean over MoE layers, without their
        coefficients) and each MoE layer's per-expert share of routed tokens (summed over all ranks;
        TP ranks that saw the same tokens cancel out in the share)."""
        losses = compat.moe_aux_losses(self.loss_names, self.num_layers)
        device = next(iter(losses.values())).device if losses else torch.device("cpu")
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
        moe_layers = counts.sum(1) > 0
        summary = {f"moe_{name}": values.sum().item() / num_microbatches / max(int(moe_layers.sum()), 1)
                   for name, values in losses.items()}
        share = counts[moe_layers] / counts[moe_layers].sum(1, keepdim=True)
        # 1.0: perfectly balanced; num_experts: one expert took every token of some layer.
        summary["moe_expert_load_max"] = share.max().item() * self.config.num_moe_experts if len(share) else 0.0
        summary["expert_load"] = {f"layer_{int(n) + 1:02d}": [round(x, 4) for x in s.tolist()]
                                  for n, s in zip(moe_layers.nonzero().flatten(), share)}
        return summary
