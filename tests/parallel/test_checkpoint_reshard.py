"""dist_checkpointing reshards routed models: a checkpoint saved on TP=2 x PP=2 loads into
TP=1 x PP=1 (and back) and the loaded model computes the same per-token losses (a function of
every logit) to 1e-6 relative in fp32; routing parameters are saved under stacked per-layer keys."""

import tempfile

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_delta import pipeline_seq_length
from megatron_delta.config import DeltaResidualConfig
from megatron_delta.mesh import destroy_model_parallel, init_model_parallel, set_seeds
from megatron_delta.parity import Mesh, Problem, _build_chunk, _microbatches, _transformer_config

PROBLEM = Problem(variant="delta_block", global_batch=4)


def _shared_tmpdir() -> str:
    name = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def _per_token_losses(model, config, delta) -> torch.Tensor:
    """Forward-only through Megatron's schedule; every rank gets the [batch, seq] losses."""
    outputs = []

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        losses = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return losses, lambda out: (outputs.append(out.detach()) or out.sum(), {})

    batches = _microbatches(PROBLEM, torch.device("cpu"))
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=pipeline_seq_length(delta, config, PROBLEM.seq), micro_batch_size=PROBLEM.micro_batch,
        forward_only=True,
    )
    losses = torch.cat(outputs) if outputs else torch.zeros(PROBLEM.global_batch, PROBLEM.seq)
    # The last pipeline stage holds them: share with every rank (sum over PP = the last stage's).
    torch.distributed.all_reduce(losses, group=parallel_state.get_pipeline_model_parallel_group())
    return losses


def _build(mesh: Mesh, delta, seed: int):
    init_model_parallel(mesh.tp, mesh.pp)
    set_seeds(seed)
    config = _transformer_config(PROBLEM, mesh)
    return _build_chunk(PROBLEM, config, vp_stage=None).eval(), config


@pytest.mark.parametrize("save_mesh, load_mesh", [(Mesh(tp=2, pp=2), Mesh()), (Mesh(), Mesh(tp=2, pp=2))],
                         ids=["tp2pp2_to_tp1", "tp1_to_tp2pp2"])
def test_checkpoint_reshards_between_meshes(save_mesh, load_mesh):
    delta = DeltaResidualConfig(variant=PROBLEM.variant, num_blocks=PROBLEM.num_blocks)
    path = _shared_tmpdir()
    try:
        model, config = _build(save_mesh, delta, seed=1)
        sharded = model.sharded_state_dict()
        router_keys = {v.key for k, v in sharded.items() if "router" in k}
        # Stacked per-layer keys with a layer axis of num_layers, like every other layer weight.
        assert "decoder.layers.attention_router.query" in router_keys
        assert all(v.global_shape[0] == PROBLEM.layers for k, v in sharded.items() if "layers" in k and "router" in k)
        dist_checkpointing.save(sharded, path)
        saved_losses = _per_token_losses(model, config, delta)
        del model, sharded
        destroy_model_parallel()

        model, config = _build(load_mesh, delta, seed=2)  # other random init: the load must overwrite it
        fresh_losses = _per_token_losses(model, config, delta)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
        loaded_losses = _per_token_losses(model, config, delta)
    finally:
        destroy_model_parallel()
    assert (fresh_losses - saved_losses).abs().max() > 1e-3  # the check is not vacuous
    rel = ((loaded_losses - saved_losses).abs().max() / saved_losses.abs().max()).item()
    assert rel < 1e-6, rel
