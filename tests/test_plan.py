"""`megatron-delta plan` against formulas and against real CPU runs.

1. The recipes: the 7.6B and 14B models have the parameter count of the textbook formula
   (embeddings + GQA attention + SwiGLU MLP + norms + routing [+ output layer]), the 7.6B model
   exactly 589,824 routing parameters, the MoE recipes (30.5B, 240B) the formula's total, expert
   and routing counts, and every recipe layout fits an 80 GiB GPU.
2. A small model on a real 4-rank torchrun (gloo) under several layouts (TP2 + SP, TP2 with full
   recompute, PP2 for four variants, PP2 x VPP2, each x DP2; with a multi-token-prediction layer on
   PP2, TP2 + SP and PP2 with full recompute), built by `megatron-delta train`'s own
   build_model and run for one step through Megatron's pipeline schedule. Per rank the plan must give
     - parameters: exactly the numel sum of the rank's real model;
     - sent bytes: exactly the size of the tensor each non-last chunk's forward returns;
     - activations per micro-batch: the bytes of the distinct storages autograd saved for backward
       during the forwards (torch.autograd.graph.saved_tensors_hooks, parameters excluded; the
       loss is a plain sum, which saves nothing). Margin: none, the figures agree to the byte for
       the local backend on CPU. (The transformer_engine terms cannot be measured without a GPU.)
3. The small model with MoE layers on DP2 x EP2 (dense DP 4, expert DP 2, distributed optimizer)
   with the alltoall and the allgather dispatcher (alltoall also with an MoE MTP layer), and on
   TP2 + SP x EP2 (alltoall with expert TP 1, allgather with expert TP 2): parameters and expert
   parameters per rank, the
   Adam state of the real optimizer after one step (dense and expert), and the bytes the token
   dispatcher hands to all-gather / reduce-scatter / all-to-all in forward and backward (counted
   by wrapping the collectives), all to the byte (the all-to-all, whose per-rank size follows the
   routing, summed over ranks).

Everything runs in one 4-rank torchrun of this file as a script (one import of Megatron per
process): rank 0 first computes the plans (before any process group exists: the planner makes its
own), then every rank measures.
"""

import json
import os
import sys

import pytest
import yaml

import launcher
from launcher import REPO
CONFIGS = os.path.join(REPO, "examples", "configs")
RECIPES = {  # config -> (nodes, GPUs per node)
    "delta_block_7p6b.yaml": (8, 8),
    "delta_block_7p6b_256gpu.yaml": (32, 8),
    "delta_block_14b_64gpu.yaml": (8, 8),
    "delta_block_14b_256gpu.yaml": (32, 8),
    "delta_block_moe_30b_a3b_64gpu.yaml": (8, 8),
    "delta_block_moe_30b_a3b_256gpu.yaml": (32, 8),
    "delta_block_moe_240b_a22b_512gpu.yaml": (64, 8),
}
TIMEOUT = 900  # seconds for the launched job (about 70 s of CPU time; more on a busy host)

SMALL = {
    "model": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=160,
                  seq_length=32, vocab_size=256, transformer_impl="local"),
    "delta": dict(variant="delta_block", num_blocks=2),
    "training": dict(micro_batch_size=2, global_batch_size=4, train_iters=1, lr_warmup_iters=0, precision="fp32",
                     eval_iters=1),
    "data": dict(blend=None, tokenizer="byte", create_attention_mask=True),
}
TP2, PP2 = "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"
VPP2 = "parallel.virtual_pipeline_model_parallel_size=2"
CASES = {
    "tp2_sp_qk_layernorm": [TP2, "parallel.sequence_parallel=true", "model.qk_layernorm=true"],
    "tp2_full_recompute": [TP2, "training.recompute_granularity=full", "training.recompute_method=uniform",
                           "training.recompute_num_layers=1"],
    "tp2_selective_recompute": [TP2, "training.recompute_granularity=selective",
                                "data.create_attention_mask=false"],
    "pp2_delta_block": [PP2],
    "pp2_delta_identity": [PP2, "delta.variant=delta", "delta.init=identity"],
    "pp2_attnres_block": [PP2, "delta.variant=attnres_block"],
    "pp2_standard": [PP2, "delta.variant=standard"],
    "pp2_vpp2_attnres_full": [PP2, VPP2, "delta.variant=attnres_full", "training.global_batch_size=8"],
    # Ranks keep sources for their later chunk (held until the earlier chunk's backward).
    "pp2_vpp2_delta": [PP2, VPP2, "delta.variant=delta", "training.global_batch_size=8"],
    "pp2_vpp2_delta_block_full_recompute": [PP2, VPP2, "training.global_batch_size=8",
                                            "training.recompute_granularity=full",
                                            "training.recompute_method=uniform", "training.recompute_num_layers=1"],
    # Megatron's MTP block on the last stage (its loss computed inside the model's forward); under
    # TP + SP its eh_proj gathers and scatters; under full recompute it checkpoints itself.
    "pp2_mtp": [PP2, "model.mtp_num_layers=1"],
    "tp2_sp_mtp": [TP2, "parallel.sequence_parallel=true", "model.mtp_num_layers=1"],
    "pp2_mtp_full_recompute": [PP2, "model.mtp_num_layers=1", "training.recompute_granularity=full",
                               "training.recompute_method=uniform", "training.recompute_num_layers=1"],
}


# The small model with MoE layers 2-4 (4 experts, top-2, a shared expert), experts on EP 2 of the
# 4 ranks: dense parameters data-parallel over 4 ranks, experts over 2 (the expert-DP group).
SMALL_MOE = {
    **SMALL,
    "model": {**SMALL["model"], "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 96,
              "moe_shared_expert_intermediate_size": 64, "moe_layer_freq": [0, 1, 1, 1], "moe_aux_loss_coeff": 1e-2},
    "parallel": {"expert_model_parallel_size": 2, "use_distributed_optimizer": True},
    "training": {**SMALL["training"], "global_batch_size": 8},
}
MOE_CASES = {
    "dp2_ep2_alltoall": ["parallel.moe_token_dispatcher_type=alltoall"],
    "dp2_ep2_allgather": ["parallel.moe_token_dispatcher_type=allgather"],
    # Tokens split over TP under SP; experts whole (expert TP 1: expert DP 2) or split (expert TP 2:
    # the allgather dispatcher's group is EP x expert TP = 4 ranks, expert DP 1).
    "tp2_sp_ep2_alltoall": [TP2, "parallel.sequence_parallel=true", "parallel.expert_tensor_parallel_size=1",
                            "parallel.moe_token_dispatcher_type=alltoall"],
    "tp2_sp_ep2_etp2_allgather": [TP2, "parallel.sequence_parallel=true",
                                  "parallel.moe_token_dispatcher_type=allgather"],
    # An MTP layer, MoE like the decoder's last layer: its experts and dispatcher traffic count too.
    "dp2_ep2_alltoall_mtp": ["parallel.moe_token_dispatcher_type=alltoall", "model.mtp_num_layers=1"],
}
WORLD = 4


# ---------------------------------------------------------------------------------------------
# The script: `torchrun --nproc_per_node=4 tests/test_plan.py OUT_DIR`


def _write_configs(tmp_dir):
    for name, config in (("small.yaml", SMALL), ("small_moe.yaml", SMALL_MOE)):
        with open(os.path.join(tmp_dir, name), "w") as f:
            yaml.safe_dump(config, f)


def _cases(out_dir):
    """(name, config path, overrides) of every measured case."""
    return ([(name, os.path.join(out_dir, "small.yaml"), overrides) for name, overrides in CASES.items()]
            + [(name, os.path.join(out_dir, "small_moe.yaml"), overrides) for name, overrides in MOE_CASES.items()])


def plan_figures(out_dir):
    """Plans of the recipes (GPU) and of the small cases (as a CPU run), and one CLI table."""
    import contextlib
    import io

    from megatron_delta.plan import main, make_plan
    from megatron_delta.run_config import load_run_config

    figures = {"recipes": {}, "cases": {}}
    for name, (nodes, gpus) in RECIPES.items():
        plan = make_plan(load_run_config(os.path.join(CONFIGS, name)), nodes, gpus)
        figures["recipes"][name] = json.loads(plan.to_json())
    for name, path, overrides in _cases(out_dir):
        plan = make_plan(load_run_config(path, overrides), 1, WORLD, on_gpu=False)
        figures["cases"][name] = json.loads(plan.to_json())
    for key, name in (("cli", "delta_block_7p6b.yaml"), ("cli_moe", "delta_block_moe_30b_a3b_64gpu.yaml")):
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            rc = main(["--config", os.path.join(CONFIGS, name), "--nodes", "8", "--gpus-per-node", "8"])
        figures[key] = {"rc": rc, "stdout": table.getvalue()}
    with open(os.path.join(out_dir, "plan.json"), "w") as f:
        json.dump(figures, f)


def plan_and_measure(out_dir):
    """Rank 0: the plans (plan_figures). Every rank of the real 4-rank run: parameters,
    saved-tensor bytes per micro-batch and sent bytes of every case; for MoE cases also the
    expert parameters, the optimizer state (dense and expert) after one step and the bytes the
    token dispatcher handed to collectives."""
    import torch

    from megatron_delta import compat, mesh

    if os.environ["RANK"] == "0":
        plan_figures(out_dir)  # before the world starts: the planner makes its own
    mesh.start_world()

    from megatron_delta.run_config import build_transformer_config, load_run_config
    from megatron_delta.train import build_model

    results = {}
    for name, path, overrides in _cases(out_dir):
        cfg = load_run_config(path, overrides)
        mesh.init_model_parallel_of(cfg.parallel)
        mesh.set_seeds(0)
        config = build_transformer_config(cfg, on_gpu=False)
        chunks = build_model(cfg, config, cfg.model.vocab_size, on_gpu=False)
        results[name] = _measure(cfg, config, chunks)
        compat.clear_moe_aux_losses()  # Megatron sizes its aux-loss records for the first model that records
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_dir, "measured.json"), "w") as f:
            json.dump(gathered, f)
    mesh.stop_world()


def _measure(cfg, config, chunks):
    """One step of Megatron's schedule on this rank's chunks, measured."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import mappings
    from megatron.core.utils import get_attr_wrapped_model

    from megatron_delta import pipeline_seq_length
    from megatron_delta.parameters import is_expert_parameter
    from megatron_delta.train import build_optimizer

    m, p, t = cfg.model, cfg.parallel, cfg.training
    params = [q for chunk in chunks for q in chunk.parameters()]
    param_storages = {q.untyped_storage().data_ptr() for q in params}
    g = torch.Generator().manual_seed(0)
    s, b = m.seq_length, t.micro_batch_size
    num_microbatches = cfg.num_microbatches(torch.distributed.get_world_size())
    vpp = p.virtual_pipeline_model_parallel_size

    def batches():  # as the data loader gives them: every micro-batch its own tensors
        for _ in range(num_microbatches):
            yield dict(
                tokens=torch.randint(0, m.vocab_size, (b, s), generator=g),
                position_ids=torch.arange(s).expand(b, s), loss_mask=torch.ones(b, s),  # fp32, as GPTDataset's
                attention_mask=(torch.ones(b, 1, s, s, dtype=torch.bool).tril().logical_not()
                                if cfg.data.create_attention_mask else None))

    sent, saved = [], {}  # saved: storage address -> (bytes, tensor kept alive: no address reuse)
    in_forward = [False]  # recomputation inside backward saves again; that is not held memory
    collectives = {"forward": {}, "backward": {}}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        in_forward[0] = True
        # As the trainer's forward_step: labels and the loss mask (the MTP block masks its losses with it).
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["tokens"],
                       loss_mask=batch["loss_mask"])
        in_forward[0] = False
        if not get_attr_wrapped_model(model, "post_process"):
            sent.append(output.numel() * output.element_size())
        # sum() keeps nothing for backward: what is saved belongs to the model.
        return output, lambda out: (out.sum(), torch.tensor(out.numel(), dtype=torch.int), {})

    def pack(tensor):
        storage = tensor.untyped_storage()
        if in_forward[0] and storage.data_ptr() not in param_storages:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), tensor))
        return tensor

    # The token dispatcher's groups (the dense layers' TP / SP collectives are not MoE traffic).
    expert_groups = {id(parallel_state.get_expert_model_parallel_group()),
                     id(parallel_state.get_expert_tensor_and_model_parallel_group()),
                     id(parallel_state.get_expert_tensor_parallel_group())}

    def counted(name, collective, buffer):
        """`collective`, adding the bytes of its argument number `buffer` (0: output, 1: input)."""
        def call(*args, **kwargs):
            if id(kwargs.get("group")) in expert_groups:
                counts = collectives["forward" if in_forward[0] else "backward"]
                counts[name] = counts.get(name, 0) + args[buffer].numel() * args[buffer].element_size()
            return collective(*args, **kwargs)
        return call

    # Megatron's mappings bind the all-gather / reduce-scatter functions at import.
    wrapped = [(mappings, "dist_all_gather_func", counted("all-gather", mappings.dist_all_gather_func, 0)),
               (mappings, "dist_reduce_scatter_func", counted("reduce-scatter", mappings.dist_reduce_scatter_func, 1)),
               (torch.distributed, "all_to_all_single", counted("all-to-all", torch.distributed.all_to_all_single, 1))]
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in wrapped]
    for module, attr, function in wrapped:
        setattr(module, attr, function)
    data = [batches() for _ in chunks] if vpp else batches()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=chunks if vpp else chunks[0],
                num_microbatches=num_microbatches, seq_length=pipeline_seq_length(cfg.delta, config, s),
                micro_batch_size=b, forward_only=False)
    finally:
        for module, attr, function in originals:
            setattr(module, attr, function)
    result = {
        "params": sum(q.numel() for q in params),
        "saved_bytes_per_microbatch": sum(nbytes for nbytes, _ in saved.values()) / num_microbatches,
        "sent_bytes": max(sent, default=0),
    }
    if m.num_moe_experts:
        finalize_model_grads(chunks)
        optimizer, _ = build_optimizer(cfg, config, chunks)
        optimizer.step()
        state = {True: 0, False: 0}  # expert? -> bytes of the Adam state this rank holds
        for sub in optimizer.chained_optimizers:
            expert = any(is_expert_parameter(q) for group in sub.model_fp32_groups + sub.model_float16_groups
                         for q in group)
            state[expert] += sum(v.numel() * v.element_size() for per_param in sub.optimizer.state.values()
                                 for key, v in per_param.items() if key != "step")
        result.update(expert_params=sum(q.numel() for q in params if is_expert_parameter(q)),
                      dense_optimizer_bytes=state[False], expert_optimizer_bytes=state[True],
                      collective_bytes={d: {n: v / num_microbatches for n, v in c.items()}
                                        for d, c in collectives.items()})
    return result


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Run the 2-rank job; the plans and the measurements it wrote."""
    out = str(tmp_path_factory.mktemp("plan"))
    _write_configs(out)
    result = launcher.torchrun(WORLD, os.path.abspath(__file__), out, timeout=TIMEOUT, merge_output=True)
    assert result.returncode == 0, result.stdout[-4000:]
    with open(os.path.join(out, "plan.json")) as f:
        planned = json.load(f)
    with open(os.path.join(out, "measured.json")) as f:
        planned["measured"] = json.load(f)
    return planned


def expected_parameters(m):
    """Embeddings + per layer (GQA attention, SwiGLU MLP, two norms, q/k norms, routing) + final
    norm (+ output layer when untied)."""
    h, heads, groups, ffn = m["hidden_size"], m["num_attention_heads"], m["num_query_groups"], m["ffn_hidden_size"]
    d = h // heads
    attention = h * (heads + 2 * groups) * d + heads * d * h + (2 * d if m.get("qk_layernorm") else 0)
    mlp = h * 2 * ffn + ffn * h
    routing = 4 * h
    layer = attention + mlp + 2 * h + routing
    embeddings = m["vocab_size"] * h * (2 if m.get("untie_embeddings_and_output_weights") else 1)
    return embeddings + m["num_layers"] * layer + h, m["num_layers"] * routing


def expected_moe_parameters(m):
    """(total, expert, routing) parameters of an all-MoE model without shared experts: per layer
    GQA attention with q/k norms, the router [experts, h], experts x SwiGLU MLPs, two norms and
    routing; untied embeddings and output layer, final norm."""
    h, heads, groups, d = m["hidden_size"], m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]
    attention = h * (heads + 2 * groups) * d + heads * d * h + 2 * d
    experts = m["num_moe_experts"] * 3 * h * m["moe_ffn_hidden_size"]
    layer = attention + m["num_moe_experts"] * h + experts + 2 * h + 4 * h
    total = 2 * m["vocab_size"] * h + m["num_layers"] * layer + h
    return total, m["num_layers"] * experts, m["num_layers"] * 4 * h


def _recipe(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return yaml.safe_load(f)


def test_7p6b_parameter_count_and_routing_parameters(figures):
    recipe = _recipe("delta_block_7p6b.yaml")["model"]
    total, routing = expected_parameters(recipe)
    assert routing == 589_824
    for name in ("delta_block_7p6b.yaml", "delta_block_7p6b_256gpu.yaml"):
        plan = figures["recipes"][name]
        assert (plan["total_params"], plan["routing_params"]) == (total, 589_824), name
    assert 7.5e9 < total < 7.7e9


def test_14b_parameter_count(figures):
    total, routing = expected_parameters(_recipe("delta_block_14b_64gpu.yaml")["model"])
    for name in ("delta_block_14b_64gpu.yaml", "delta_block_14b_256gpu.yaml"):
        plan = figures["recipes"][name]
        assert (plan["total_params"], plan["routing_params"]) == (total, routing), name
    assert 14e9 < total < 15.5e9


@pytest.mark.parametrize("name", ["delta_block_moe_30b_a3b_64gpu.yaml", "delta_block_moe_30b_a3b_256gpu.yaml",
                                  "delta_block_moe_240b_a22b_512gpu.yaml"])
def test_moe_recipe_parameter_counts(figures, name):
    """The MoE recipes: totals of the formula (30.5B and 240B), every GPU holding its 1/EP of the
    experts, and expert optimizer state sharded over the expert-DP group (world / (PP x EP))."""
    m, plan = _recipe(name)["model"], figures["recipes"][name]
    total, experts, routing = expected_moe_parameters(m)
    assert (plan["total_params"], plan["expert_params"], plan["routing_params"]) == (total, experts, routing)
    nodes, gpus = RECIPES[name]
    assert plan["expert_dp"] == nodes * gpus // (plan["pp"] * plan["ep"])
    layers_per_stage = m["num_layers"] // plan["pp"]
    for stage in plan["stages"]:
        assert stage["moe_layers"] == layers_per_stage
        assert stage["expert_params"] == experts // m["num_layers"] * layers_per_stage // plan["ep"]
        assert stage["expert_optimizer_bytes"] == 12 * stage["expert_params"] // plan["expert_dp"]
    assert (29e9 < total < 31e9) if "30b" in name else (200e9 < total < 250e9)


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_layouts_fit_80gb_and_match_the_cluster(figures, name):
    plan = figures["recipes"][name]
    nodes, gpus = RECIPES[name]
    assert plan["tp"] * plan["pp"] * plan["dp"] == nodes * gpus
    assert plan["tp"] <= gpus  # tensor parallelism stays inside a node (NVLink)
    assert all(stage["fits"] for stage in plan["stages"]), [s["total_bytes"] / 2**30 for s in plan["stages"]]
    # Per-rank parameters add up to the model (TP shards x stages, the tied output copy aside).
    for stage in plan["stages"]:
        assert stage["weight_bytes"] == 2 * stage["params"] and stage["grad_bytes"] == 4 * stage["params"]


def _rank_stage(plan, rank):
    """The plan's row for a global rank of the measurement (Megatron's rank order puts the pipeline
    rank outermost)."""
    return plan["stages"][rank // (WORLD // plan["pp"])]


@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_a_real_four_rank_run(figures, case):
    plan = figures["cases"][case]
    for rank, measured in enumerate(figures["measured"]):
        stage, real = _rank_stage(plan, rank), measured[case]
        assert stage["params"] == real["params"], (rank, stage["params"], real["params"])
        assert stage["send_bytes_per_microbatch"] == real["sent_bytes"], (rank, stage, real)
        planned, saved = stage["activation_bytes_per_microbatch"], real["saved_bytes_per_microbatch"]
        assert planned == saved, (rank, planned, saved, stage["activation_parts"])


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_plan_matches_a_real_four_rank_run(figures, case):
    """Per rank: parameters and expert parameters exactly; the Adam state after one step of the
    distributed optimizer (dense parameters sharded over DP = 4 / TP ranks, experts over their
    expert-DP group of 4 / (EP x expert TP)) exactly, summed over the ranks (a rank's own shard
    follows Megatron's bucket layout); the token dispatcher's collective bytes in forward and
    backward exactly, the all-to-all (whose per-rank size follows the routing) summed over the ranks."""
    plan, measured = figures["cases"][case], [ranks[case] for ranks in figures["measured"]]
    assert plan["ep"] == 2 and plan["dp"] == WORLD // plan["tp"]
    assert plan["expert_dp"] == WORLD // (plan["ep"] * plan["etp"])
    stage = plan["stages"][0]
    mtp_layers = 1 if "model.mtp_num_layers=1" in MOE_CASES[case] else 0
    assert stage["moe_layers"] == 3 + mtp_layers and 0 < stage["expert_params"] < stage["params"]
    # Depth routing only: 4 x hidden per layer, not the MoE layers' expert routers.
    assert plan["routing_params"] == 4 * SMALL["model"]["hidden_size"] * SMALL["model"]["num_layers"]
    for real in measured:
        assert (stage["params"], stage["expert_params"]) == (real["params"], real["expert_params"])
    dense_optimizer = stage["optimizer_bytes"] - stage["expert_optimizer_bytes"]
    assert dense_optimizer == 8 * (stage["params"] - stage["expert_params"]) // plan["dp"]  # fp32 Adam: 2 x 4 B
    assert stage["expert_optimizer_bytes"] == 8 * stage["expert_params"] // plan["expert_dp"]
    assert sum(real["dense_optimizer_bytes"] for real in measured) == WORLD * dense_optimizer
    assert sum(real["expert_optimizer_bytes"] for real in measured) == WORLD * stage["expert_optimizer_bytes"]
    for direction in ("forward", "backward"):
        planned = stage["moe_collective_bytes"][direction]
        assert planned, direction
        for rank, real in enumerate(measured):
            got = real["collective_bytes"][direction]
            assert set(got) == set(planned), (direction, got, planned)
            exact = {name for name in planned if name != "all-to-all"}
            assert {n: got[n] for n in exact} == {n: planned[n] for n in exact}, (rank, direction, got, planned)
        if "all-to-all" in planned:
            total = sum(real["collective_bytes"][direction]["all-to-all"] for real in measured)
            assert total == WORLD * planned["all-to-all"], (direction, total, planned)


def test_moe_dispatcher_traffic_by_hand(figures):
    """One MoE layer, 64 tokens per rank (2 x 32), hidden 64, 4 experts, top-2, fp32, EP 2:
    alltoall sends 64 x 2 rows of tokens and probabilities each way, allgather gathers 2 x 64."""
    tokens, h, experts, k, n, e = 64, 64, 4, 2, 2, 4
    alltoall = figures["cases"]["dp2_ep2_alltoall"]["stages"][0]["moe_collective_bytes"]
    assert alltoall["forward"] == {"all-gather": 3 * n * experts * 8, "all-to-all": 3 * tokens * k * (2 * h + 1) * e}
    allgather = figures["cases"]["dp2_ep2_allgather"]["stages"][0]["moe_collective_bytes"]
    assert allgather["forward"] == {"all-gather": 3 * n * tokens * (experts * (1 + e) + h * e),
                                    "reduce-scatter": 3 * n * tokens * h * e}


def test_pipeline_boundaries_carry_the_routing_state(figures):
    """delta (4 layers, PP2): x, x_0 and the 4 sublayer outputs of stage 0 = 6 slots of
    [s, b, h] fp32; the standard model sends x alone."""
    slot = SMALL["model"]["seq_length"] * SMALL["training"]["micro_batch_size"] * SMALL["model"]["hidden_size"] * 4
    assert figures["cases"]["pp2_delta_identity"]["stages"][0]["send_bytes_per_microbatch"] == 6 * slot
    assert figures["cases"]["pp2_standard"]["stages"][0]["send_bytes_per_microbatch"] == slot


def test_mtp_adds_its_part_to_the_last_stage_only(figures):
    """The MTP block changes nothing on the first stage; on the last it adds its "mtp" part
    (which the real run measures, test_plan_matches_a_real_four_rank_run) and nothing else."""
    with_mtp, without = figures["cases"]["pp2_mtp"]["stages"], figures["cases"]["pp2_delta_block"]["stages"]
    assert with_mtp[0]["activation_parts"] == {**without[0]["activation_parts"], "mtp": 0}
    mtp = with_mtp[1]["activation_parts"]["mtp"]
    assert mtp > 0
    assert with_mtp[1]["activation_bytes_per_microbatch"] == without[1]["activation_bytes_per_microbatch"] + mtp
    assert "mtp" not in without[1]["activation_parts"]


def test_interleaved_schedule_holds_more_microbatches_than_1f1b(figures):
    plan = figures["cases"]["pp2_vpp2_attnres_full"]
    # Megatron's interleaved warm-up: (pp - r - 1) * 2 + (vpp - 1) * pp forwards, +1 in steady state,
    # capped by micro-batches x chunks = 4.
    assert [s["microbatches_in_flight"] for s in plan["stages"]] == [4, 3]
    assert [s["microbatches_in_flight"] for s in figures["cases"]["pp2_delta_block"]["stages"]] == [1, 1]


def test_cli_prints_a_table_per_pipeline_rank(figures):
    cli = figures["cli"]
    assert cli["rc"] == 0
    lines = cli["stdout"].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("pp rank  layers"))
    assert set(lines[header + 1]) <= {"-", " "}
    rows = lines[header + 2:header + 4]
    assert [row.split()[0] for row in rows] == ["0", "1"] and all(row.split()[-1] == "yes" for row in rows)
    assert "7,568,995,328 parameters (589,824 routing)" in cli["stdout"]


def test_cli_prints_the_expert_layout_and_dispatcher_traffic(figures):
    cli = figures["cli_moe"]
    assert cli["rc"] == 0
    out = cli["stdout"]
    assert "experts: EP 8 x expert TP 1 x expert DP 8, alltoall dispatcher" in out
    assert "30,532,515,840 parameters (393,216 routing)" in out
    assert "128 experts, top-8, expert ffn 768, 48 MoE layers: 28,991,029,248 expert parameters" in out
    header = next(line for line in out.splitlines() if line.startswith("pp rank  MoE layers"))
    assert header.split()[-6:] == ["all-gather", "fwd", "all-to-all", "fwd", "all-to-all", "bwd"]


@pytest.mark.parametrize("key", ["cli", "cli_moe"])
def test_scale_plan_doc_pastes_the_current_output(figures, key):
    """docs/scale_plan.md shows what `megatron-delta plan` prints today (after its first line,
    which names the config path)."""
    with open(os.path.join(REPO, "docs", "scale_plan.md"), encoding="utf-8") as f:
        doc = f.read()
    body = figures[key]["stdout"].split("\n", 1)[1].rstrip("\n")
    assert body in doc


def test_bad_layout_is_a_clear_error(capsys):
    from megatron_delta.plan import main

    rc = main(["--config", os.path.join(CONFIGS, "delta_block_7p6b.yaml"), "--nodes", "3", "--gpus-per-node", "8"])
    assert rc == 2
    assert "parallel.data_parallel_size=8 but world size 24 / (tp 4 x pp 2) = 3" in capsys.readouterr().err


if __name__ == "__main__":
    plan_and_measure(sys.argv[1])
