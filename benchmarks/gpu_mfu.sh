#!/usr/bin/env bash
# CoCa-Base (288px, the paper's shapes) train-step MFU on one GPU, several configurations in one
# go, each in its own process (a fresh compile, no memory carried over). Prints a table and writes
# every configuration's `coca_jax.bench --json` line to $OUT/mfu.jsonl (or ./mfu.jsonl).
#
#   benchmarks/gpu_mfu.sh                 # all variants below
#   VARIANTS="b64_dots_xla b64_none_cudnn" benchmarks/gpu_mfu.sh
#
# Needs jax with CUDA, flax, optax, orbax, etils, einops, absl and ml_collections. A variant that
# fails (out of memory, an unsupported kernel) is reported as failed and the next one runs.
set -u
out=${OUT:-.}
per_variant_s=${PER_VARIANT_S:-110}
python=${PYTHON:-python3}
export COCA_JAX_ALLOCATOR=system TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
# name: batch remat attention(auto: cuDNN where it has a kernel, e.g. not the 1-query pooler) XLA-flags
declare -A spec=(
  [b2_dots_xla]="2 dots xla"
  [b64_dots_xla]="64 dots xla"
  [b64_dots_auto]="64 dots auto"
  [b64_none_auto]="64 none auto"
  [b128_none_xla]="128 none xla"
  [b128_none_auto]="128 none auto"
  [b256_none_auto]="256 none auto"
  [b128_none_auto_cublas]="128 none auto --xla_gpu_enable_triton_gemm=false"
  [b256_dots_auto]="256 dots auto"
  [b256_none_auto_cublas]="256 none auto --xla_gpu_enable_triton_gemm=false"
  [b512_dots_auto]="512 dots auto"
  [b768_dots_auto]="768 dots auto"
  [b512_full_auto]="512 full auto"
  [b1024_full_auto]="1024 full auto"
  [b256_dots_attention_auto]="256 dots_attention auto"
  [b512_dots_attention_auto]="512 dots_attention auto"
)
# First the best setting measured so far (batch 256-512, remat dots) for a before/after of the
# odd attention lengths padded for cuDNN (the multimodal decoder; docs/performance.md), then remat
# dots_attention (no attention forward recomputed; estimated -1.7%), then full remat at the
# batches its memory allows (estimated as fast as dots). Each line carries hlo_cost's estimate
# beside the measurement. Not here: three XLA options compiled without a device produced the
# same module (cudnn_layer_norm, cublaslt) or failed to compile (dynamic_slice_fusion).
order=${VARIANTS:-"b256_dots_auto b256_dots_attention_auto b512_dots_auto b512_dots_attention_auto b512_full_auto b1024_full_auto"}
$python - <<'PY'
import jax, flax, optax, orbax.checkpoint as ocp
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", ocp.__version__ if hasattr(ocp, "__version__") else "?", jax.devices())
PY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv || true
# A seconds-long smoke run first: a broken environment fails here, not after the first compile.
if ! timeout 120 $python -m coca_jax.bench --config experiments/demo.py:smoke --mode train \
    --steps 2 --json > "$out/smoke.json" 2> "$out/smoke.err"; then
  echo "smoke run failed:"; grep -v '^[IW][0-9]' "$out/smoke.err" | tail -25; exit 1
fi
echo "smoke ok: $(tail -c 300 "$out/smoke.json")"
for name in $order; do
  read -r batch remat attention flags <<<"${spec[$name]}"
  echo "== $name: batch $batch remat $remat attention $attention ${flags:-}"
  COCA_JAX_ATTENTION=$attention XLA_FLAGS="${flags:-}" timeout "$per_variant_s" \
    $python -m coca_jax.bench --config "experiments/coca_base.py:batch=$batch,remat=$remat" \
      --mode train --steps "${STEPS:-10}" --json > "$out/$name.json" 2> "$out/$name.err"
  rc=$?
  if [ $rc -eq 0 ]; then
    $python -c "import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1]); r['variant']=sys.argv[2]; r['xla_flags']=sys.argv[3]; print(json.dumps(r))" \
      "$out/$name.json" "$name" "${flags:-}" >> "$out/mfu.jsonl"
  else
    echo "{\"variant\": \"$name\", \"failed\": $rc}" >> "$out/mfu.jsonl"
    tail -5 "$out/$name.err"
  fi
done
$python - "$out/mfu.jsonl" <<'PY'
import json, sys
print(f"{'variant':<26}{'step s':>9}{'ex/s':>9}{'TFLOP/s':>9}{'MFU':>8}{'GiB':>8}{'compile':>9}"
      f"{'est. s':>9}")
for line in open(sys.argv[1]):
  r = json.loads(line)
  if "failed" in r:
    print(f"{r['variant']:<26} failed (rc {r['failed']})"); continue
  print(f"{r['variant']:<26}{r['step_seconds']:>9.4f}{r['examples_per_second']:>9.1f}"
        f"{r['model_tflops_per_sec_per_device']:>9.1f}{r['mfu']:>8.3f}"
        f"{r.get('bytes_per_device', 0) / 2**30:>8.1f}{r['compile_seconds']:>9.1f}"
        f"{r.get('estimated_step_seconds', float('nan')):>9.4f}")
PY
