#!/usr/bin/env bash
# The GPU check: what only a CUDA machine can show, in one run of under 8 minutes, every figure in one log.
#
#   bash benchmarks/gpu_check.sh fetch WHEELS           # where pip reaches PyPI: the wheels a bare GPU image lacks
#   bash benchmarks/gpu_check.sh run WHEELS [OUT_DIR]   # on the GPU machine (no network needed)
#
# `run` expects a CUDA machine with Python 3.12 and its own torch (e.g. an H100/H200 image with torch 2.11
# and no megatron-core). It installs the wheels in WHEELS into a private folder with --no-deps (the
# machine's torch and triton stay as they are), runs this checkout's code from the source tree, and writes
# OUT_DIR/gpu_check.log (default OUT_DIR: runs/gpu_check):
#   1. device, driver, torch, triton, megatron-core versions
#   2. the kernel and model tests on the GPU (pytest tests/test_kernels.py tests/test_model.py)
#   3. benchmarks/bench_routing.py (fused kernels vs the reference, achieved HBM bandwidth)
#   4. benchmarks/bench_step.py --shape 1b (the paper's 1044M model, bf16) for standard, delta_block,
#      delta: step time and peak memory as ratios against standard, measured in the same run
#   5. a 20-step bf16 `megatron-delta train` of the paper's 220M shape on one GPU (demo corpus)
# Each step has its own time limit; a failing step is logged with its exit status and the next runs.
set -uo pipefail
mode=${1:?usage: gpu_check.sh fetch WHEELS | run WHEELS [OUT_DIR]}
wheels=${2:?usage: gpu_check.sh fetch WHEELS | run WHEELS [OUT_DIR]}
repo=$(cd "$(dirname "$0")/.." && pwd)

if [ "$mode" = fetch ]; then
    # megatron-core (the newest supported release) and nltk (sentence splitting in data.py) are what the
    # GPU image lacks; everything else megatron-delta imports ships with it.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" \
        megatron-core==0.19.2 nltk
    ls -l "$wheels"
    exit 0
fi
[ "$mode" = run ] || { echo "gpu_check.sh: unknown mode $mode (fetch or run)" >&2; exit 2; }

out=${3:-$repo/runs/gpu_check}
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
site="$out/site-packages"
python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl || exit 1
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
cd "$repo"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log output and exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name | $(date -u +%FT%TZ) | $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

step environment 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
    python3 -c "import sys, torch, triton, megatron.core as m; print(\"python\", sys.version.split()[0], \"| torch\",
    torch.__version__, \"| triton\", triton.__version__, \"| megatron-core\", m.__version__, \"|\",
    torch.cuda.get_device_name())"'
step "kernel and model tests" 150 python3 -m pytest tests/test_kernels.py tests/test_model.py -q -p no:cacheprovider
step bench_routing 90 python3 benchmarks/bench_routing.py
step "bench_step 1b" 150 python3 benchmarks/bench_step.py --shape 1b --transformer-impl local \
    --variants standard delta_block delta
step "train 220M bf16, 20 steps" 150 python3 -m megatron_delta.cli train --config examples/configs/paper_220m.yaml \
    --set model.transformer_impl=local --set model.vocab_size=null --set model.seq_length=1024 \
    --set data.blend=null --set data.tokenizer=byte --set data.tokenizer_path=null --set data.split=90,10,0 \
    --set "data.cache_dir=$out/data" --set parallel.data_parallel_size=null \
    --set parallel.use_distributed_optimizer=false --set parallel.overlap_grad_reduce=false \
    --set training.micro_batch_size=4 --set training.global_batch_size=8 --set training.train_iters=20 \
    --set training.lr_warmup_iters=2 --set training.eval_interval=null --set training.eval_iters=2 \
    --set checkpoint.save_interval=null --set checkpoint.save_on_exit=false \
    --set "logging.dir=$out/train" --set logging.log_interval=5
echo "figures: $log"
