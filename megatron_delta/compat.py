"""The megatron-core releases megatron-delta supports, and every difference between them.

Supported: megatron-core 0.16.1 (Python 3.10/3.11) through 0.19.x (Python 3.12+); CI runs the
whole suite on 0.16.1 and on 0.19.2. Any other release gets a one-line UnsupportedMegatronCore
(check_supported) before anything is built, instead of a failure deep inside a forward pass.

What changed between those releases that touches megatron-delta, and where it is absorbed:

    0.17  TransformerLayer.__init__ gains is_mtp_layer, add_layer_offset, pp_layer_offset (0.18:
          name); TransformerBlock.forward gains extract_layer_indices. DeltaTransformerLayer and
          DeltaTransformerBlock pass Megatron's keyword arguments through, whatever they are.
    0.17  DDP's gradient sync orders its collectives against torch.cuda.current_stream(), the
          MoE all-to-all dispatcher builds a torch.cuda.Stream: covered by cpu_shim (CPU runs
          only; on GPUs these are real streams).
    0.18  TransformerBlock._checkpointed_forward moves to megatron.core.recompute: the routed
          block checkpoints its own depth state with tensor_parallel.checkpoint, in every release.
    0.19  get_tensor_shapes returns [()] under variable_seq_lengths: the pipeline transport never
          sets it (it packs along the sequence dimension and hands the schedule a longer
          seq_length instead).
    0.17  the MoE aux-loss tracker moves to moe_logging.MoEMetricsTracker (0.16: a dict in
          moe_utils); megatron-core 0.16 also references TE's te_general_gemm without TE (cpu_shim
          defines it): moe_aux_losses() / clear_moe_aux_losses().
    0.19  with calculate_per_token_loss the MoE router pre-multiplies its aux / z loss by its local
          token count x the TP size (0.16: without the TP size, which under sequence parallelism
          left their gradients 1/TP too small): moe_loss_coeff_scale().
    0.17  GPTModel.sharded_state_dict of a pipeline stage with the MTP block reads
          metadata["dp_cp_group"] without filling it in (0.16; fixed later): DeltaGPTModel
          passes sharded_state_dict_metadata(metadata).
    0.17+ the MTP loss tracker keeps the losses under "loss_values" (with acceptance counts; 0.16:
          "values"): take_mtp_losses().
    0.19  the MTP loss guards its division by the token count against empty micro-batches, and
          autograd keeps three scalars per MTP layer for it instead of one (found in the source;
          0.17 / 0.18 not measured): mtp_loss_kept_scalars().
    0.17  the tokenizers' detokenize keeps special tokens (0.18: unless told otherwise): detokenize().
    0.19  Megatron-LM's pretrain() takes a config container instead of a model provider:
          megatron_delta.megatron_lm (Megatron-LM's training code is not part of megatron-core).
"""

from __future__ import annotations

import importlib.util
import inspect

from megatron.core import package_info
from packaging.version import Version

OLDEST = (0, 16, 1)
NEWEST_MINOR = (0, 19)  # the newest minor release tested; (0, 20) and later are refused
MEGATRON_CORE_VERSION = (Version(package_info.__shortversion__).release + (0, 0))[:3]


class UnsupportedMegatronCore(RuntimeError):
    """The installed megatron-core is outside the range megatron-delta is tested on."""


def check_supported(version: tuple | None = None) -> None:
    """Raise UnsupportedMegatronCore, in one line that names the fix, if `version` (default: the
    installed release) is outside the supported range. The CLI calls it before any command,
    DeltaGPTModel before building anything."""
    version = version or MEGATRON_CORE_VERSION
    if version < OLDEST or version[:2] > NEWEST_MINOR:
        raise UnsupportedMegatronCore(
            f"megatron-core {'.'.join(map(str, version))} is not supported by megatron-delta: install a release "
            f"from {'.'.join(map(str, OLDEST))} to {'.'.join(map(str, NEWEST_MINOR))}.x "
            "(pip install 'megatron-core>=0.16.1,<0.20'; 0.17 and later need Python >= 3.12)"
        )


def detokenize(tokenizer, ids) -> str:
    """Text of token ids without special tokens (end-of-document, padding), in every release.
    0.16 drops them; 0.17 keeps them (its Hugging Face library takes remove_special_tokens, the
    tokenizer does not pass it on); 0.18+ keep them unless detokenize gets skip_special_tokens."""
    if MEGATRON_CORE_VERSION >= (0, 18, 0):
        return tokenizer.detokenize(ids, skip_special_tokens=True)
    if MEGATRON_CORE_VERSION >= (0, 17, 0):
        library = tokenizer._tokenizer
        if "remove_special_tokens" in inspect.signature(library.ids_to_text).parameters:
            return library.ids_to_text(ids, remove_special_tokens=True)
    return tokenizer.detokenize(ids)


# The aux-loss tracker's home from megatron-core 0.17 (0.16: a plain dict in moe_utils).
_HAS_MOE_METRICS_TRACKER = importlib.util.find_spec("megatron.core.transformer.moe.moe_logging") is not None


def moe_aux_losses(names, num_layers: int) -> dict:
    """{name: per-layer values} of the MoE auxiliary losses `names` ("load_balancing_loss",
    "z_loss", ...) recorded since the last clear_moe_aux_losses(): Megatron records each without
    its coefficient, summed over micro-batches; reduced over pipeline / tensor / data-parallel
    ranks the way Megatron's own logging reduces them. `num_layers`: decoder + MTP layers (a
    stage without MoE layers contributes zeros). Collective over the model-parallel world."""
    if _HAS_MOE_METRICS_TRACKER:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        tracker = get_moe_metrics_tracker()
        for name in names:
            tracker.ensure_initialized(name, num_layers)
        tracker._sync_metrics(list(names))  # what its report() does before aggregating
        return {name: tracker.metrics[name].values for name in names}
    import torch
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    for name in names:  # what its track_moe_metrics(force_initialize=True) does
        tracker.setdefault(name, {"values": torch.zeros(num_layers, device=torch.cuda.current_device()),
                                  "reduce_group": None, "avg_group": None})
    moe_utils.reduce_aux_losses_tracker_across_ranks(list(names))
    return {name: tracker[name]["values"] for name in names}


def clear_moe_aux_losses() -> None:
    """Forget everything the MoE aux-loss tracker recorded (after each training step; entries are
    recreated at the next record, sized for the model that records them)."""
    if _HAS_MOE_METRICS_TRACKER:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        get_moe_metrics_tracker().metrics.clear()
        return
    from megatron.core.transformer.moe import moe_utils

    moe_utils.get_moe_layer_wise_logging_tracker().clear()


def take_mtp_losses(num_layers: int):
    """Per MTP layer, the losses Megatron's MTP block recorded on this rank since the last call
    (each micro-batch's token-mean loss, summed over micro-batches; zeros where none was
    recorded, e.g. off the last pipeline stage), then forgets them. Not reduced over ranks."""
    import torch
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    recorded = tracker.get("loss_values", tracker.get("values"))
    losses = recorded.detach().clone() if recorded is not None else torch.zeros(num_layers)
    for values in (tracker.get(name) for name in ("values", "loss_values", "correct_values", "total_values")):
        if values is not None:
            values.zero_()
    return losses


def mtp_loss_kept_scalars() -> int:
    """0-dim tensors autograd keeps per MTP layer and micro-batch where GPTModel divides the MTP
    loss by its token count (the loss mask's sum): 0.16 keeps the count; releases that guard
    against a micro-batch without tokens (`num_tokens.clamp(min=1)`, measured on 0.19) keep
    the `num_tokens > 0` factor and two clamped counts instead."""
    from megatron.core.transformer import multi_token_prediction

    return 3 if "num_tokens.clamp(min=1)" in inspect.getsource(multi_token_prediction) else 1


def sharded_state_dict_metadata(metadata):
    """`metadata` for GPTModel.sharded_state_dict with its data-parallel group filled in, as later
    releases do inside GPTModel (megatron-core 0.16 reads it unfilled on an MTP pipeline stage)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return ensure_metadata_has_dp_cp_group(metadata)


def moe_loss_coeff_scale(tensor_model_parallel_size: int, sequence_parallel: bool) -> int:
    """The factor on moe_aux_loss_coeff and moe_z_loss_coeff that gives their gradients the
    intended weight under calculate_per_token_loss (1 / (micro-batches x DP), as without it).
    finalize_model_grads divides every gradient by the global token count; the router cancels
    that by pre-multiplying its losses by its own token count, which sequence parallelism divides
    by the TP size. Releases with the fix also multiply by the TP size; for the others (0.16)
    the coefficient carries it. The logged losses are unweighted and do not change."""
    if tensor_model_parallel_size == 1 or not sequence_parallel:
        return 1
    from megatron.core.transformer.moe.router import TopKRouter

    fixed = "tp_cp_group.size()" in inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)
    return 1 if fixed else tensor_model_parallel_size
