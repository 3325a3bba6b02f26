#!/usr/bin/env bash
# The GPU measurements recorded in benchmarks/README.md, most important first, each stage under
# its own time limit so that a short GPU lease still returns what finished:
#   bash benchmarks/gpu.sh RESULTS_DIR
# writes RESULTS_DIR/<stage>.json (fl-llm bench's JSON) and RESULTS_DIR/all.log.
# On the lent GPU machine fl_llm needs Ray, datasets and cryptography carried in:
#   bash ../shared/device/make-bundle.sh cryptography==50.0.2 cffi pycparser
# then carry .devpkgs and run: . .devpkgs/setup.sh && bash benchmarks/gpu.sh $OUT
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
# GPU memory in GiB decides what the 8B step stage can hold without gradient checkpointing:
# on an 80 GB card the padded variants (92 GiB on an H200) cannot run, so they get their own
# stage with checkpointing, as in the padded 8B anchor.
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
big=$([ "${mem:-0}" -gt 100000 ] && echo 1 || echo 0)
# 0. the variable-length attention kernel against one attention per example (forward, backward)
echo "== varlen ($(date +%T))" | tee -a "$log"
# (`-o addopts=...`: the device bundle has no pytest-xdist, and one GPU test runs in one process)
timeout 40 "$py" -m pytest -q -p no:cacheprovider -o addopts=--strict-markers tests/test_gpu.py -k varlen >>"$log" 2>&1
echo "== varlen: exit $?" | tee -a "$log"
# 1. 8 platforms of the Llama-3-8B shape on one GPU, one resident base: a short federated run
#    (10 local steps: enough training per round for the <=3% overhead target to be measurable)
stage 8b_8_platforms 300 configs/llama8b_8_platforms.yaml --shape 8b --variants fl_llm_packed --rounds 3 \
  --steps 2 --warmup 1 client.local_steps=10 "data.synthetic.train_examples=[256]" data.synthetic.eval_examples=16
# 2. TinyLlama-1.1B shape: fl_llm's step (packed, padded) against plain transformers + peft
stage 1b 70 "${lora[@]}" client.batch_size=64 --shape 1b --rounds 0
# 3. Llama-3-8B shape, one platform: the step variants (packed at batch 32 needs ~72 GiB)
if [ "$big" = 1 ]; then
  stage 8b 80 "${lora[@]}" client.batch_size=32 --shape 8b --rounds 0 --steps 5 --warmup 2
else
  stage 8b 80 "${lora[@]}" client.batch_size=24 --shape 8b --rounds 0 --steps 5 --warmup 2 \
    --variants baseline_packed,fl_llm_packed
  stage 8b_checkpointing 80 "${lora[@]}" client.batch_size=32 client.gradient_checkpointing=true --shape 8b \
    --rounds 0 --steps 5 --warmup 2 --variants baseline_padded,fl_llm_packed
fi
# optional: compiled blocks, flex attention, QLoRA (EXTRA=1; minutes of compilation)
if [ "${EXTRA:-0}" = 1 ]; then
  stage 1b_compile 300 "${lora[@]}" client.batch_size=64 client.compile=true --shape 1b --rounds 0 --variants fl_llm_packed
  stage 1b_flex 300 "${lora[@]}" client.batch_size=64 model.attn_implementation=flex_attention --shape 1b \
    --rounds 0 --variants fl_llm_packed
  timeout 120 "$py" -m pytest -q -p no:cacheprovider -o addopts=--strict-markers tests/test_gpu.py -k qlora >>"$log" 2>&1
  echo "== qlora: exit $?" | tee -a "$log"
fi
# several GPUs for one platform (ray.workers_per_platform), on a machine with 2 or more:
# tokens/s of one platform on 1, 2, 4 GPUs (DDP), and the 8B shape sharded over 2 GPUs (FSDP)
gpus=$(nvidia-smi --list-gpus | wc -l)
if [ "$gpus" -ge 2 ]; then
  counts=$([ "$gpus" -ge 4 ] && echo 1,2,4 || echo 1,2)
  stage 1b_workers 400 "${lora[@]}" client.batch_size=64 ray.gpus_per_worker=1 client.local_steps=10 \
    "data.synthetic.train_examples=[512]" data.synthetic.eval_examples=16 --shape 1b --workers "$counts" --rounds 3
  stage 8b_fsdp 400 "${lora[@]}" client.batch_size=16 ray.gpus_per_worker=1 client.parallel=fsdp client.local_steps=5 \
    "data.synthetic.train_examples=[256]" data.synthetic.eval_examples=16 --shape 8b --workers 2 --rounds 2
fi
