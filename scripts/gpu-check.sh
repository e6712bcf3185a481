#!/usr/bin/env bash
# The chain on one GPU, as a new user would run it, in one call of under 10 minutes:
#   stage 1 -> latents (GPU encoder actor; then bench_latents on the GPU) -> CALM (paper head, then adanorm, then compiled)
#   -> the baseline (eager, then compiled) -> generation (batch and exact temperature)
#   -> serving (Ray Serve on the GPU, both batching policies, against in-process batched generation)
# and a summary of tokens/s and MFU per stage (bench/gpu_summary.py). Logs go to $OUT (or ./gpu-out).
#
#   bash ../shared/tools/gpu-kit/prepare.sh                         # here, once: .gpu/
#   mkdir -p .gpu-data && cp ../shared/data/tinystories-sample/train.txt .gpu-data/
#   cp ../shared/data/wikitext-103-test/wikitext_document_level-test.json .gpu-data/   # bench_released's corpus
#   device: command "source .gpu/install.sh && bash scripts/gpu-check.sh", carry [".gpu", ".gpu-data"]
#
# Each job start costs ~50-60 s there (Ray, Ray Train, DeepSpeed); every step has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
CORPUS=${CORPUS:-.gpu-data/train.txt}
RUN=${RUN:-/tmp/calm-gpu-run}
GPU="distributed.use_gpu=true distributed.num_workers=1 distributed.cpus_per_worker=8 ray.num_cpus=16 latents.use_gpu=true"
# the paper-ablation backbone (d=768, 12 layers, L=512 chunks = 2048 tokens) on the small AE
BIG="model.d_model=768 model.n_layers=12 model.n_heads=12 model.ffn_dim=2048 model.block_chunks=512"
S2="stage2.batch_size=8 stage2.max_steps=60 stage2.log_every=30 stage2.checkpoint_every=60 stage2.val_max_chunks=4096 stage2.max_minutes=0"
BL="baseline.batch_size=8 baseline.max_steps=60 baseline.log_every=30 baseline.checkpoint_every=60 baseline.val_max_chunks=4096 baseline.max_minutes=0"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, record the status
    local name=$1 secs=$2
    shift 2
    echo "[gpu-check] $name" >&2
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt" >&2
}

rm -rf "$RUN"
step stage1 120 python jobs/stage1.py --config small --corpus "$CORPUS" --run "$RUN" $GPU stage1.max_steps=1500 stage1.max_minutes=1.5
step latents 90 python jobs/precompute_latents.py --config small --corpus "$CORPUS" --run "$RUN" $GPU
# the streaming precompute with the encoder on the GPU and the 16 CPUs reading and tokenising for it
# (written device-agnostic: --gpu only sets latents.use_gpu; not yet run on a device)
step latents_bench 150 python bench/bench_latents.py --ae "$RUN/ae" --corpus "$CORPUS" --config small --gpu \
    --shard-documents 20000 500 --skip-actors --skip-dtype --skip-fixed --stage-chunks 20000 \
    --out "$OUT/latents_gpu.json" ray.num_cpus=16 latents.batch_size=8192 latents.cpus_per_actor=2
step calm_paper 100 python jobs/stage2.py --config small --run "$RUN" $GPU $BIG $S2 head.arch=paper head.init=torch
cp -r "$RUN/calm" "$OUT/calm_paper_artifact" 2>/dev/null && rm -f "$OUT/calm_paper_artifact/model.safetensors"
step calm_adanorm 100 python jobs/stage2.py --config small --run "$RUN" --overwrite $GPU $BIG $S2 head.arch=adanorm head.init=torch
cp -r "$RUN/calm" "$OUT/calm_adanorm_artifact" 2>/dev/null && rm -f "$OUT/calm_adanorm_artifact/model.safetensors"
step calm_compiled 130 python jobs/stage2.py --config small --run "$RUN" --overwrite $GPU $BIG $S2 distributed.compile=true
step baseline 100 python jobs/baseline.py --config small --run "$RUN" $GPU $BIG $BL
cp -r "$RUN/baseline" "$OUT/baseline_artifact" 2>/dev/null && rm -f "$OUT/baseline_artifact/model.safetensors"
step baseline_compiled 130 python jobs/baseline.py --config small --run "$RUN" --overwrite $GPU $BIG $BL distributed.compile=true
step generate 60 python jobs/generate.py --run "$RUN" --prompt "Once upon a time" --chunks 16 --temperature 0.5 --samples 2
step generate_exact 60 python jobs/generate.py --run "$RUN" --prompt "Once upon a time" --chunks 16 --temperature 0.5 --sampler exact --max-draws 400
step serve 200 python bench/bench_serve.py --run "$RUN" --corpus "$CORPUS" --concurrency 1 32 --requests 32 \
    --max-tokens 64 --out "$OUT/serve.json" serve.device=cuda serve.gpus_per_replica=0.25 serve.cpus_per_replica=1
for f in "$RUN"/calm "$RUN"/baseline; do cp -r "$f" "$OUT/$(basename "$f")_compiled_artifact" 2>/dev/null; done
rm -f "$OUT"/*_compiled_artifact/model.safetensors
# the released sizes (random CALM-M, its AE, the baseline, as on the Hub): import, the paper's evaluation, generation
# at T = 1 and 0.5, serving, fine-tuning at ZeRO-2 and -3; its rows reach $OUT/released.json after every step
step released 300 python bench/bench_released.py --scale released --device cuda --work /tmp/bench-released \
    --corpus .gpu-data/wikitext_document_level-test.json --ft-corpus "$CORPUS" --json "$OUT/released.json"
python bench/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
