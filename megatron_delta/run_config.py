"""The YAML run config of `megatron-delta train`: one dataclass per section, strict parsing,
command-line overrides, and every check that can be made before a process group starts.

    model:      the GPT shape (-> megatron.core TransformerConfig)
    delta:      megatron_delta.config.DeltaResidualConfig (which depth-routing variant)
    parallel:   the mesh: tensor / pipeline / virtual pipeline / sequence parallel, dist. optimizer
    training:   batch sizes, steps, optimiser, schedule, precision, evaluation cadence
    data:       megatron_delta.data.DataConfig (corpus blend, split, tokenizer)
    checkpoint: where and how often to save, what to resume from
    logging:    run directory, console / TensorBoard / metrics.jsonl cadence

    cfg = load_run_config("examples/configs/tiny_cpu.yaml", overrides=["training.lr=3e-4"])
    cfg.validate(world_size=8)            # RunConfigError naming the key; imports no torch or Megatron
    tc = build_transformer_config(cfg, on_gpu=False)  # + Megatron's own checks, also a RunConfigError
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Literal, Optional

import yaml

from megatron_delta.config import DeltaConfigError, DeltaResidualConfig, check_pipeline_split
from megatron_delta.data_config import DataConfig, DataError


class RunConfigError(ValueError):
    """A run config that cannot work; the message names the key and the fix."""


@dataclasses.dataclass
class ModelConfig:
    """GPT shape. Field names follow Megatron's TransformerConfig / GPTModel arguments."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention; < heads: GQA
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    kv_channels: Optional[int] = None  # head dim; None: hidden_size / num_attention_heads
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None  # None: seq_length
    vocab_size: Optional[int] = None  # None: the tokenizer's, padded (see below)
    make_vocab_size_divisible_by: int = 128  # see padded_vocab_size
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["gelu", "swiglu"] = "swiglu"
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    qk_layernorm: bool = False
    add_bias_linear: bool = False
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    # Mixture of experts (Megatron's TransformerConfig fields; num_moe_experts null: dense MLPs).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # None: ffn_hidden_size
    moe_shared_expert_intermediate_size: Optional[int] = None  # None: no shared expert
    moe_layer_freq: typing.Union[int, list[int]] = 1  # 1: every layer MoE; [0, 1, 1, ...]: per layer
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False  # softmax over all experts before top-k (else over the k chosen)
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3); needs sigmoid
    moe_router_bias_update_rate: float = 1e-3
    moe_grouped_gemm: bool = False
    mtp_num_layers: Optional[int] = None  # multi-token prediction layers (Megatron's MTP block); None: off


@dataclasses.dataclass
class ParallelConfig:
    """The mesh. The data-parallel size is what is left: world_size / (tp * pp)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per pipeline rank
    sequence_parallel: bool = False
    data_parallel_size: Optional[int] = None  # optional assertion on the launched world size
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    expert_model_parallel_size: int = 1  # MoE: experts split over this many ranks of a stage's DP x TP ranks
    expert_tensor_parallel_size: Optional[int] = None  # None: tensor_model_parallel_size
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "allgather"


@dataclasses.dataclass
class TrainingConfig:
    """Optimiser, schedule and cadence. Defaults are the paper's recipe: 10K steps of AdamW
    (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0, cosine 6e-4 -> 6e-5 with 1000 warmup steps."""

    micro_batch_size: int = 1
    global_batch_size: int = 8
    # Sizes the training dataset (train_iters x global_batch_size samples). Past one epoch,
    # GPTDataset shuffles over all epochs, so changing it on resume changes the sample order.
    train_iters: int = 10000
    lr: float = 6e-4
    min_lr: float = 6e-5
    lr_warmup_iters: int = 1000
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    # Learning rate of the routing parameters (the depth routers', parameters.ROUTER_PARAM_PATTERN)
    # relative to `lr`; the reference fine-tunes a pretrained model with routers at 100x (5e-3 vs 5e-5).
    router_lr_mult: float = 1.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # CPU runs always use fp32
    initial_loss_scale: float = 2.0**16  # fp16 only (dynamic loss scaling)
    seed: int = 1234
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None
    eval_interval: Optional[int] = 100  # None: evaluate only at the end
    eval_iters: int = 10  # global batches of the validation split per evaluation


@dataclasses.dataclass
class CheckpointConfig:
    """dist_checkpointing saves: <dir>/iter_XXXXXXX/ plus an atomically written `latest`."""

    dir: Optional[str] = None  # None: <logging.dir>/checkpoints
    save_interval: Optional[int] = None  # None: save only on exit (end of training or signal)
    save_on_exit: bool = True
    resume: Optional[str] = None  # "auto": latest complete checkpoint in `dir` if any; or a path
    # Start from this checkpoint when there is nothing to resume: a dist-checkpoint (e.g. from
    # `megatron-delta convert import`) or a trainer checkpoint directory (its `latest`).
    load: Optional[str] = None
    finetune: bool = False  # with `load`: model weights only; optimizer, schedule, data start fresh
    # Optimizer state layout of the distributed optimizer: fully_reshardable loads on any mesh;
    # dp_reshardable saves faster at scale but loads only with the same TP x PP.
    distributed_optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    # Keep only the newest N complete checkpoints (older ones are deleted once a newer one is
    # complete); None keeps all.
    keep_last: Optional[int] = None


@dataclasses.dataclass
class LoggingConfig:
    dir: str = "runs/default"  # metrics.jsonl, TensorBoard events, checkpoints, resolved config
    log_interval: int = 10  # progress line, metrics.jsonl and routing statistics every N steps
    tensorboard: bool = True


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    delta: DeltaResidualConfig = dataclasses.field(default_factory=DeltaResidualConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.logging.dir}/checkpoints"

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size)

    def num_microbatches(self, world_size: int) -> int:
        return self.training.global_batch_size // (
            self.training.micro_batch_size * self.data_parallel_size(world_size)
        )

    def validate(self, world_size: int) -> None:
        """Every mesh / shape / schedule check that needs neither a process group nor Megatron
        (build_transformer_config adds Megatron's own)."""
        _validate(self, world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Parsing


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (None: all defaults), apply `section.key=value` overrides (values are
    YAML: `--set data.blend=null`, `--set training.lr=3e-4`), build the typed config."""
    raw = {}
    if path is not None:
        raw = _parse_yaml(path)
        if raw is None:
            raise RunConfigError(f"{path} is empty; a run config has sections such as model:, training:, data: "
                                 f"(see examples/configs)")
        if not isinstance(raw, dict):
            raise RunConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            raise RunConfigError(f"--set {item!r}: expected section.key=value, e.g. training.lr=3e-4")
        section, name = key.split(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise RunConfigError(f"{section} must be a mapping of keys")
        try:
            raw[section][name] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise RunConfigError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return from_dict(raw)


def _parse_yaml(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise RunConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise RunConfigError(f"{where}: invalid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(error) -> str:
    return " ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part) \
        or str(error).splitlines()[0]


def from_dict(raw: dict) -> RunConfig:
    return _build(RunConfig, raw, "")


def _build(cls, values, path: str):
    if not isinstance(values, dict):
        raise RunConfigError(f"{path or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise RunConfigError(f"unknown key {where!r}; known keys here: {', '.join(fields)}")
    kwargs = {
        key: _coerce(value, hints[key], f"{path}.{key}" if path else key) for key, value in values.items()
    }
    try:
        return cls(**kwargs)
    except (DeltaConfigError, DataError) as e:  # their messages name the field
        raise RunConfigError(str(e)) from None


def _coerce(value, hint, path: str):
    """Check `value` against a type hint; returns it (ints widened to float where a float is
    wanted). Sections are dataclasses, built recursively."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except RunConfigError as e:
                errors.append(str(e))
        raise RunConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r} has the wrong type ({hint})")
    if origin is Literal:
        if value not in args:
            raise RunConfigError(f"{path}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RunConfigError(f"{path}={value!r} must be a list")
        item = args[0] if args else typing.Any
        return origin(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is typing.Any:
        return value
    if hint in (list, dict):
        if not isinstance(value, hint):
            raise RunConfigError(f"{path}={value!r} must be a {'list' if hint is list else 'mapping'}")
        return value
    if hint is float:
        # PyYAML reads "3e-4" (no dot) as a string; accept what float() accepts.
        number = None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise RunConfigError(f"{path}={value!r} must be a number")
        if not math.isfinite(number):
            raise RunConfigError(f"{path}={value!r} must be a finite number")
        return number
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RunConfigError(f"{path}={value!r} must be an integer")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RunConfigError(f"{path}={value!r} must be true or false")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RunConfigError(f"{path}={value!r} must be a string")
    raise RunConfigError(f"{path}: unsupported config type {hint}")


# ---------------------------------------------------------------------------------------------
# Checks and the Megatron TransformerConfig


def _validate(cfg: RunConfig, world_size: int) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size

    def check(ok, message):
        if not ok:
            raise RunConfigError(message)

    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "model.seq_length": m.seq_length,
        "parallel.tensor_model_parallel_size": tp, "parallel.pipeline_model_parallel_size": pp,
        "training.micro_batch_size": t.micro_batch_size, "training.global_batch_size": t.global_batch_size,
        "training.train_iters": t.train_iters, "training.eval_iters": t.eval_iters,
        "logging.log_interval": cfg.logging.log_interval,
    }
    for key, value in positive.items():
        check(value >= 1, f"{key}={value} must be >= 1")
    for key, value in {"training.eval_interval": t.eval_interval,
                       "checkpoint.save_interval": cfg.checkpoint.save_interval,
                       "checkpoint.keep_last": cfg.checkpoint.keep_last,
                       "parallel.virtual_pipeline_model_parallel_size": vpp}.items():
        check(value is None or value >= 1, f"{key}={value} must be >= 1 or null")

    # Optimiser and model hyper-parameters that Megatron would take silently.
    check(t.lr > 0, f"training.lr={t.lr} must be > 0")
    for key in ("adam_beta1", "adam_beta2"):
        check(0 <= getattr(t, key) < 1, f"training.{key}={getattr(t, key)} must be in [0, 1)")
    check(t.adam_eps > 0, f"training.adam_eps={t.adam_eps} must be > 0")
    check(t.weight_decay >= 0, f"training.weight_decay={t.weight_decay} must be >= 0")
    check(t.initial_loss_scale > 0, f"training.initial_loss_scale={t.initial_loss_scale} must be > 0")
    check(m.init_method_std > 0, f"model.init_method_std={m.init_method_std} must be > 0")
    check(m.norm_epsilon > 0, f"model.norm_epsilon={m.norm_epsilon} must be > 0")
    for key in ("hidden_dropout", "attention_dropout"):
        check(0 <= getattr(m, key) < 1, f"model.{key}={getattr(m, key)} must be in [0, 1)")

    # Mesh.
    check(world_size % (tp * pp) == 0,
          f"parallel: world size {world_size} is not divisible by tensor_model_parallel_size x "
          f"pipeline_model_parallel_size = {tp} x {pp}; launch a multiple of {tp * pp} processes")
    dp = world_size // (tp * pp)
    check(p.data_parallel_size in (None, dp),
          f"parallel.data_parallel_size={p.data_parallel_size} but world size {world_size} / (tp {tp} x pp {pp}) "
          f"= {dp}; launch {p.data_parallel_size * tp * pp if p.data_parallel_size else '?'} processes or fix the key")
    check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
          f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x "
          f"data-parallel size = {t.micro_batch_size} x {dp}")
    check(vpp is None or pp > 1,
          "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1; set it null")
    if vpp is not None:
        micro = cfg.num_microbatches(world_size)
        check(micro % pp == 0,
              f"training.global_batch_size={t.global_batch_size} gives {micro} microbatches per data-parallel "
              f"rank; the interleaved pipeline schedule needs a multiple of pipeline_model_parallel_size={pp}")
    check(not p.sequence_parallel or tp > 1,
          "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1; set it false")
    check(not p.sequence_parallel or m.seq_length % tp == 0,
          f"model.seq_length={m.seq_length} must be divisible by tensor_model_parallel_size={tp} "
          f"under sequence parallelism")
    check(not cfg.checkpoint.finetune or cfg.checkpoint.load is not None,
          "checkpoint.finetune=true needs checkpoint.load (the checkpoint whose weights to start from)")
    check(not p.overlap_param_gather or p.use_distributed_optimizer,
          "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")

    # Shapes against the mesh.
    check(m.num_attention_heads % tp == 0,
          f"model.num_attention_heads={m.num_attention_heads} is not divisible by tensor_model_parallel_size={tp}")
    groups = m.num_query_groups or m.num_attention_heads
    check(m.num_attention_heads % groups == 0,
          f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups={groups}")
    check(groups % tp == 0,
          f"model.num_query_groups={groups} is not divisible by tensor_model_parallel_size={tp}")
    check(m.kv_channels is not None or m.hidden_size % m.num_attention_heads == 0,
          f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
          f"{m.num_attention_heads}; change one or set model.kv_channels")
    check(m.vocab_size is None or m.vocab_size % tp == 0,
          f"model.vocab_size={m.vocab_size} is not divisible by tensor_model_parallel_size={tp}; pad it "
          f"or set it null (the tokenizer's vocabulary, padded)")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    check(ffn % tp == 0, f"model.ffn_hidden_size={ffn} is not divisible by tensor_model_parallel_size={tp}")
    try:
        check_pipeline_split(m.num_layers, pp, vpp, stages="pipeline_model_parallel_size x "
                             "virtual_pipeline_model_parallel_size")
    except DeltaConfigError as e:
        raise RunConfigError(str(e)) from None
    max_pos = m.max_position_embeddings or m.seq_length
    check(m.position_embedding_type == "rope" or max_pos >= m.seq_length,
          f"model.max_position_embeddings={max_pos} < model.seq_length={m.seq_length}")

    # Experts against the mesh (Megatron's TransformerConfig checks the rest).
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
    check(ep == 1 or m.num_moe_experts, "parallel.expert_model_parallel_size > 1 needs model.num_moe_experts")
    if m.num_moe_experts:
        check(m.num_moe_experts % ep == 0,
              f"model.num_moe_experts={m.num_moe_experts} is not divisible by "
              f"parallel.expert_model_parallel_size={ep}")
        check(ep == 1 or tp == 1 or p.sequence_parallel,
              "parallel.expert_model_parallel_size > 1 with tensor_model_parallel_size > 1 needs "
              "parallel.sequence_parallel=true (Megatron's MoE layers require it)")
        check((world_size // pp) % (ep * etp) == 0,
              f"parallel: expert_model_parallel_size x expert_tensor_parallel_size = {ep} x {etp} does not divide "
              f"the {world_size // pp} ranks of a pipeline stage")

    # Schedule.
    check(t.lr_warmup_iters >= 0, f"training.lr_warmup_iters={t.lr_warmup_iters} must be >= 0")
    check(t.lr_decay_iters is None or t.lr_decay_iters >= 1,
          f"training.lr_decay_iters={t.lr_decay_iters} must be >= 1 or null")
    decay = t.lr_decay_iters or t.train_iters
    check(t.lr_warmup_iters < decay,
          f"training.lr_warmup_iters={t.lr_warmup_iters} must be < lr_decay_iters={decay} "
          f"(lr_decay_iters defaults to train_iters)")
    check(0 <= t.min_lr <= t.lr, f"training.min_lr={t.min_lr} must be in [0, training.lr={t.lr}]")
    check(t.router_lr_mult > 0, f"training.router_lr_mult={t.router_lr_mult} must be > 0")
    check(t.clip_grad >= 0, f"training.clip_grad={t.clip_grad} must be >= 0 (0 disables clipping)")

    split = [float(w) for w in str(cfg.data.split).split(",")]  # DataConfig checked the format
    check(len(split) > 1 and split[1] > 0,
          f"data.split={cfg.data.split!r} has no validation part; training evaluates on it: "
          f"give it a weight, e.g. '90,10,0'")


def padded_vocab_size(cfg: RunConfig, tokenizer_vocab_size: int) -> int:
    """The tokenizer's vocabulary padded to a multiple of make_vocab_size_divisible_by and of the
    TP size (so the embedding splits evenly). Megatron-LM pads to divisor x TP instead, which
    makes the vocabulary, and so the loss, depend on the mesh (a TP1 checkpoint would load into
    a larger TP2 embedding with freshly initialised rows); lcm keeps it the same for every TP
    size that divides the divisor."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    multiple = math.lcm(cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    return int(math.ceil(tokenizer_vocab_size / multiple) * multiple)


def build_transformer_config(cfg: RunConfig, on_gpu: bool):
    """The Megatron TransformerConfig of this run, after Megatron's own checks and the routing
    ones (delta.validate_for), either of which is a RunConfigError. On CPU (on_gpu=False) the run
    is fp32 and builds weights on the CPU; on GPU it uses training.precision."""
    try:
        transformer_config = _transformer_config(cfg, on_gpu)
        cfg.delta.validate_for(transformer_config)
    except DeltaConfigError as e:
        raise RunConfigError(str(e)) from None
    except (AssertionError, ValueError) as e:
        raise RunConfigError(f"Megatron TransformerConfig rejected the model/parallel sections: {e}") from None
    return transformer_config


def _transformer_config(cfg: RunConfig, on_gpu: bool):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    m, p, t = cfg.model, cfg.parallel, cfg.training
    precision = t.precision if on_gpu else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # The loss is the token mean over the whole global batch (all microbatches, all DP ranks):
        # finalize_model_grads divides the summed gradients by the global token count.
        calculate_per_token_loss=True,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        # CPU: build full weights on the host and slice them, so that every TP mesh starts from
        # the same weights as one process; gradient_accumulation_fusion needs a CUDA kernel.
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        # gloo pairs batched isend/irecv in posting order and swaps same-shape tensors of the
        # interleaved schedule when prev == next rank (see the CPU notes); NCCL batches safely.
        batch_p2p_comm=on_gpu,
        deallocate_pipeline_outputs=True,
        bias_activation_fusion=on_gpu and not m.add_bias_linear and m.activation == "swiglu",
        masked_softmax_fusion=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        **_moe_fields(cfg),
    )


def _moe_fields(cfg: RunConfig) -> dict:
    """The MoE and MTP fields of the TransformerConfig (none for a dense model)."""
    from megatron_delta import compat

    m, p = cfg.model, cfg.parallel
    fields = {"mtp_num_layers": m.mtp_num_layers}
    if not m.num_moe_experts:
        return fields
    scale = compat.moe_loss_coeff_scale(p.tensor_model_parallel_size, p.sequence_parallel)
    return {
        **fields, "num_moe_experts": m.num_moe_experts, "moe_router_topk": m.moe_router_topk,
        "moe_ffn_hidden_size": m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
        "moe_shared_expert_intermediate_size": m.moe_shared_expert_intermediate_size,
        "moe_layer_freq": m.moe_layer_freq, "moe_router_load_balancing_type": m.moe_router_load_balancing_type,
        "moe_aux_loss_coeff": m.moe_aux_loss_coeff * scale,
        "moe_z_loss_coeff": m.moe_z_loss_coeff and m.moe_z_loss_coeff * scale,
        "moe_router_score_function": m.moe_router_score_function, "moe_router_pre_softmax": m.moe_router_pre_softmax,
        "moe_router_enable_expert_bias": m.moe_router_enable_expert_bias,
        "moe_router_bias_update_rate": m.moe_router_bias_update_rate, "moe_grouped_gemm": m.moe_grouped_gemm,
        "expert_model_parallel_size": p.expert_model_parallel_size,
        "expert_tensor_parallel_size": p.expert_tensor_parallel_size,
        "moe_token_dispatcher_type": p.moe_token_dispatcher_type,
    }


def build_model_chunk(cfg: RunConfig, config, vocab_size: int, vp_stage=None, backend: str | None = None,
                      pre_process: bool | None = None, post_process: bool | None = None, pg_collection=None):
    """The DeltaGPTModel that `cfg` describes for this rank and virtual pipeline stage, unwrapped
    (the trainer adds Float16Module / DDP; convert and plan use it as is). Pre/post-processing
    default to what parallel_state says for this rank."""
    from megatron.core import parallel_state

    from megatron_delta.model import DeltaGPTModel, get_gpt_delta_model_specs

    m = cfg.model
    backend = backend or m.transformer_impl
    spec_kwargs = {"qk_layernorm": m.qk_layernorm}
    if backend == "local":  # the TE spec takes the norm type from the TransformerConfig
        spec_kwargs["normalization"] = m.normalization
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    pp_rank = None
    if pg_collection is not None:
        from megatron.core.utils import get_pg_rank

        pp_rank = get_pg_rank(pg_collection.pp)
    layer_spec, mtp_block_spec = get_gpt_delta_model_specs(cfg.delta, config, backend, vp_stage, pp_rank, **spec_kwargs)
    return DeltaGPTModel(
        config=config, delta=cfg.delta, transformer_layer_spec=layer_spec, mtp_block_spec=mtp_block_spec,
        vocab_size=vocab_size, max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
        vp_stage=vp_stage, pg_collection=pg_collection,
    )
