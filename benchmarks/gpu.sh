#!/usr/bin/env bash
# The GPU measurements recorded in benchmarks/README.md, most important first, each stage under
# its own time limit so that a short GPU lease still returns what finished:
#   bash benchmarks/gpu.sh RESULTS_DIR
# writes RESULTS_DIR/<stage>.json (fl-llm bench's JSON) and RESULTS_DIR/all.log.
set -u
out=${1:-bench-results}
mkdir -p "$out"
log="$out/all.log"
py=${PYTHON:-python3}
lora=(model.dtype=bfloat16 model.lora.r=16 model.lora.alpha=32 "model.lora.target_modules=[all-linear]")

stage() {  # stage NAME SECONDS fl-llm-bench-args...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s): fl-llm bench $*" | tee -a "$log"
  timeout "$limit" "$py" -m fl_llm bench "$@" --out "$out/$name.json" >>"$log" 2>&1
  echo "== $name: exit $?" | tee -a "$log"
  grep -E "^(hardware|shape|  |federation)" "$log" | tail -n 14
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} >>"$log" 2>&1
# 1. TinyLlama-1.1B shape: fl_llm's step (packed, padded) against plain transformers + peft
stage 1b 110 "${lora[@]}" client.batch_size=64 --shape 1b --rounds 0
# 2. 8 platforms of the Llama-3-8B shape on one GPU, one resident base: a short federated run
stage 8b_8_platforms 180 configs/llama8b_8_platforms.yaml --shape 8b --variants fl_llm_packed --rounds 3 \
  --steps 4 --warmup 1 client.local_steps=4 "data.synthetic.train_examples=[256]" data.synthetic.eval_examples=32
# 3. Llama-3-8B shape, one platform: the four step variants
stage 8b 110 "${lora[@]}" client.batch_size=32 --shape 8b --rounds 0 --steps 5 --warmup 2
# 4. the 1.1B step with compiled blocks, and with flex attention (block-sparse packed rows)
stage 1b_compile 90 "${lora[@]}" client.batch_size=64 client.compile=true --shape 1b --rounds 0 --variants fl_llm_packed
stage 1b_flex 50 "${lora[@]}" client.batch_size=64 model.attn_implementation=flex_attention --shape 1b --rounds 0 \
  --variants fl_llm_packed
# 5. QLoRA (4-bit base, bitsandbytes) with 3 platforms on one GPU: the gpu-marked test
echo "== qlora ($(date +%T))" | tee -a "$log"
timeout 45 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py >>"$log" 2>&1
echo "== qlora: exit $?" | tee -a "$log"
tail -n 3 "$log"
