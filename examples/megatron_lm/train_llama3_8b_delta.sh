#!/bin/bash
# Llama-3 8B, FP8 on H100: Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh (tags
# core_v0.16.1 and core_v0.19.0) with delta residuals. Same model, data, optimizer and FP8 settings; the
# differences are the DELTA_ARGS block and the launcher (pretrain_gpt_delta.py, which runs
# Megatron-LM's pretrain_gpt.py machinery unmodified).
#
#   MEGATRON_LM_PATH=/path/to/Megatron-LM bash train_llama3_8b_delta.sh \
#       [CHECKPOINT_PATH] [TENSORBOARD_LOGS_PATH] [TOKENIZER_MODEL|MOCK] [DATA_PREFIX|MOCK]
#
# A fork patched with patches/megatron-lm-<tag>-delta.patch can run its own script
# instead: PRETRAIN_SCRIPT=/path/to/fork/pretrain_gpt.py.
# Variables below marked "override" can be set in the environment (e.g. PP_SIZE=2 VPP_LAYERS=4).
set -euo pipefail

: "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout at tag core_v0.16.1 or core_v0.19.0}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PRETRAIN_SCRIPT=${PRETRAIN_SCRIPT:-"$HERE/pretrain_gpt_delta.py"}
export PYTHONPATH="$MEGATRON_LM_PATH${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

CHECKPOINT_PATH=${1:-"checkpoints/llama3_8b_fp8_delta"}
TENSORBOARD_LOGS_PATH=${2:-"tensorboard_logs/llama3_8b_fp8_delta"}
TOKENIZER_ARG=${3:-"MOCK"}
DATA_ARG=${4:-"MOCK"}
mkdir -p "$(dirname "$CHECKPOINT_PATH")" "$(dirname "$TENSORBOARD_LOGS_PATH")"
DATA_CACHE_PATH="${PWD}/benchmark_cache_llama3_8b_fp8_delta"
mkdir -p "$DATA_CACHE_PATH"

# Cluster shape (override).
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

# Parallel layout (override). Upstream runs TP=1, CP=1, PP=1 (data parallel only); delta routing
# does not support context parallelism yet, so CP stays 1. With PP > 1,
# the stages exchange the routing sources packed along the sequence dimension; pick
# num-layers / (PP x virtual stages) so every chunk has the same number of layers.
TP_SIZE=${TP_SIZE:-1}
CP_SIZE=1
PP_SIZE=${PP_SIZE:-1}
VPP_LAYERS=${VPP_LAYERS:-}   # layers per virtual pipeline stage (interleaved 1F1B), empty = off

# Delta residuals (override). 32 layers in 8 blocks of 4: each sublayer routes over the embedding
# and the completed block outputs, i.e. at most 9 sources.
DELTA_VARIANT=${DELTA_VARIANT:-delta_block}
DELTA_NUM_BLOCKS=${DELTA_NUM_BLOCKS:-8}
DELTA_INIT=${DELTA_INIT:-reference}      # identity when continuing from a standard checkpoint
DELTA_ROUTER_LR_MULT=${DELTA_ROUTER_LR_MULT:-1.0}

DISTRIBUTED_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE"
    --nnodes "$NUM_NODES"
    --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR"
    --master_port "$MASTER_PORT"
)

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length 8192
    --max-position-embeddings 8192
    --position-embedding-type rope
    --rotary-base 1000000
    --rotary-percent 1.0
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --swiglu
    --normalization RMSNorm      # as in core_v0.19.0's recipe (core_v0.16.1's left LayerNorm)
    --init-method-std 0.0134
    --attention-backend fused
    --apply-layernorm-1p
    --untie-embeddings-and-output-weights
    --disable-bias-linear
)

DELTA_ARGS=(
    --delta-variant "$DELTA_VARIANT"
    --delta-num-blocks "$DELTA_NUM_BLOCKS"
    --delta-init "$DELTA_INIT"
    --delta-router-lr-mult "$DELTA_ROUTER_LR_MULT"
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 128
    --train-samples 1953125000
    --lr-decay-samples 1949218748
    --lr-warmup-samples 3906252
    --lr 0.00015
    --min-lr 0.00001
    --decoupled-lr 5.0e-4        # embedding and output layer (decoupled AdamW)
    --decoupled-min-lr 4.5e-5
    --lr-decay-style cosine
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --bf16
    --grad-reduce-in-bf16
    --cross-entropy-loss-fusion
    --calculate-per-token-loss
    --manual-gc
    --empty-unused-memory-level 1
    --exit-duration-in-mins 235
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

# FP8 runs only in Transformer Engine GEMMs; the routing itself stays in bf16 / fp32.
FP8_ARGS=(
    --fp8-format hybrid
    --fp8-amax-history-len 1024
    --fp8-amax-compute-algo max
    --fp8-param-gather
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP_SIZE"
    --context-parallel-size "$CP_SIZE"
    --pipeline-model-parallel-size "$PP_SIZE"
    --sequence-parallel          # Megatron-LM turns it off when TP = 1
)
if [[ -n "$VPP_LAYERS" ]]; then
    MODEL_PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
fi

DATA_ARGS=(
    --data-cache-path "$DATA_CACHE_PATH"
    --split 99,1,0
    --no-create-attention-mask-in-dataloader
    --no-mmap-bin-files
    --num-workers 1
    --vocab-size 128256
)
if [[ "$TOKENIZER_ARG" == "MOCK" || "$DATA_ARG" == "MOCK" ]]; then
    DATA_ARGS+=(--mock-data --tokenizer-type NullTokenizer --tiktoken-pattern v2)
else
    DATA_ARGS+=(--data-path "$DATA_ARG" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_ARG")
fi

EVAL_AND_LOGGING_ARGS=(
    --log-interval 1
    --eval-iters 32
    --eval-interval 100
    --save-interval 1000
    --log-throughput
    --profile
    --profile-step-start 4
    --profile-step-end 6
    --ckpt-format torch_dist
    --distributed-timeout-minutes 60
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
    --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
)

exec torchrun "${DISTRIBUTED_ARGS[@]}" "$PRETRAIN_SCRIPT" \
    "${MODEL_ARGS[@]}" \
    "${DELTA_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${FP8_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${EVAL_AND_LOGGING_ARGS[@]}"
