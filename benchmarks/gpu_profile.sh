#!/usr/bin/env bash
# Where a CoCa-Base train step's time goes on one GPU: the matmul rates its shapes can reach
# (benchmarks/matmul_ceiling.py), then a profile of each configuration below
# (benchmarks/profile_train_step.py: top ops, kinds of op, model parts; GPU command buffers off so
# that each kernel is attributed to its op), each in its own process. Writes ceiling.txt and
# <name>.txt to $OUT (or .). Each profile takes ~60 s on an H200 (compile ~40 s).
#
#   benchmarks/gpu_profile.sh
#   PROFILES="b256_dots b512_dots" benchmarks/gpu_profile.sh
set -u
out=${OUT:-.}
python=${PYTHON:-python3}
per_profile_s=${PER_PROFILE_S:-200}
export COCA_JAX_ALLOCATOR=system TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
# name: config overrides (batch, remat, layer stack, ...) | XLA flags
# (b256_none_unrolled did not finish compiling within 135 s on an H200.)
declare -A spec=(
  [b256_none]="experiments/coca_base.py:batch=256,remat=none|"
  [b256_dots]="experiments/coca_base.py:batch=256,remat=dots|"
  [b512_dots]="experiments/coca_base.py:batch=512,remat=dots|"
  [b256_none_unrolled]="experiments/coca_base.py:batch=256,remat=none --config.model.scan_layers=False|"
)
# b256_dots first: the default setting, profiled since odd lengths reach cuDNN (docs/performance.md).
order=${PROFILES:-"b256_dots b512_dots"}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv || true
timeout 120 $python benchmarks/matmul_ceiling.py --batch 256 2>&1 | tee "$out/ceiling.txt"
for name in $order; do
  IFS='|' read -r args flags <<<"${spec[$name]}"
  echo "== $name: $args ${flags:-}"
  start=$(date +%s)
  XLA_FLAGS="${flags:-}" timeout "$per_profile_s" $python benchmarks/profile_train_step.py \
      --config $args --steps "${STEPS:-4}" --top "${TOP:-40}" --trace_dir "/tmp/trace_$name" \
      > "$out/$name.txt" 2> "$out/$name.err"
  echo "rc $? after $(( $(date +%s) - start )) s"
  grep -v '^[IW][0-9]' "$out/$name.err" | tail -5
  cat "$out/$name.txt"
done
