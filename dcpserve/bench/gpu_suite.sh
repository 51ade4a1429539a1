#!/usr/bin/env bash
# GPU checks and benchmarks for issue 4, run on the lent 4-GPU machine:  bash dcpserve/bench/gpu_suite.sh PART...
# PARTs: hf (tiny transformers-equivalence tests on GPU, torch and Triton backends), check (greedy tokens on the
# benchmark model across DCP sizes, backends, eager/graphs, with logit gaps at any mismatch), profile (per-kernel
# device time of a decode step, DCP1 vs DCP4, CUDA graphs; PROFILE_EAGER=1 for eager, PROFILE_PHASE=prefill for prefill steps), perf (end-to-end table), acc (demo-model accuracy table), hfcmp (transformers vs dcpserve,
# one GPU; HFCMP_FP8=1 on a DeepSeek block-fp8 checkpoint), p2p (the peer-to-peer DCP collectives' GPU tests), p2pbatch (p2p vs NCCL
# a2a decode step by batch), fp8 (the fp8-weight kernels' GPU tests and their decode-batch table; one GPU), prefill (the
# prefill attention kernel's GPU tests and its tile table at the engine's chunk shapes; one GPU). TP=2 PROFILE_DCP="1 2" run them on a 2-GPU machine; HF_TIMEOUT (default 330 s) bounds each hf pytest run. Everything lands in $OUT: log.txt and one JSON/txt per part.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"
BENCH="--model-path builtin:deepseek-v3.2 --load-format dummy --tp ${TP:-4} --attention-backend triton --kv-mem-gb 8"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$LOG"
for part in "$@"; do
  echo "=== $part $(date +%T)" | tee -a "$LOG"
  case "$part" in
  hf)
    SEL="v32-1-1 or v32-2-2-a2a-sharded or v32-4-4-ag_rs-replicated or v32-4-2-a2a-sharded or v3-4-2 or fp8-4-2 or p2p"
    timeout ${HF_TIMEOUT:-330} python -m pytest -x -q -p no:cacheprovider tests/test_hf_equivalence.py -k "$SEL" 2>&1 | tail -3 | tee -a "$LOG"
    DCPSERVE_TEST_BACKEND=triton timeout ${HF_TIMEOUT:-330} python -m pytest -x -q -p no:cacheprovider tests/test_hf_equivalence.py \
        tests/test_triton_backend.py -k "$SEL or triton_backend" 2>&1 | tail -8 | tee -a "$LOG" ;;
  check)
    timeout 240 python -m dcpserve.bench.engine $BENCH --num-layers 4 --dcp 1,2,4 --batch 2 --input-len 2100 \
        --output-len 24 --logits --out "$OUT/check.json" \
        --compare "torch-dcp1-eager:dcp=1,attention_backend=torch,disable_cuda_graph=true;triton-dcp4-eager:dcp=4,disable_cuda_graph=true;triton-dcp4-repl-ag_rs:dcp=4,dcp_indexer=replicated,dcp_comm=ag_rs" \
        2>&1 | tail -9 | tee -a "$LOG" ;;
  check32)  # fp32 weights and activations: no bf16 near-ties, so greedy tokens must agree everywhere (CHECK_KV=fp8_e4m3 or
            # bf16: that cache, read by the Hopper decode kernels; the default fp32 cache takes the portable ones)
    timeout ${CHECK_TIMEOUT:-170} python -m dcpserve.bench.engine $BENCH --dtype float32 --num-layers 4 --dcp 1,2,4 --batch 2 \
        --input-len 2100 --output-len 12 --logits --out "$OUT/check32.json" ${CHECK_QUANT:+--quantization $CHECK_QUANT} ${CHECK_KV:+--kv-cache-dtype $CHECK_KV} \
        --compare "torch-dcp4-eager:dcp=4,attention_backend=torch,disable_cuda_graph=true;triton-dcp4-eager-repl-ag_rs:dcp=4,disable_cuda_graph=true,dcp_indexer=replicated,dcp_comm=ag_rs;triton-dcp4-a2a:dcp=4,dcp_comm=a2a;triton-dcp2-eager:dcp=2,disable_cuda_graph=true" \
        2>&1 | tail -11 | tee -a "$LOG" ;;
  p2p)  # the peer-to-peer DCP collectives: kernels on one GPU, then 2 and 4 ranks against NCCL
    timeout ${P2P_TIMEOUT:-300} python -m pytest -x -q -p no:cacheprovider tests/kernels/test_p2p.py tests/test_p2p_gpu.py \
        2>&1 | tail -8 | tee -a "$LOG" ;;
  profile)
    for d in ${PROFILE_DCP:-1 4}; do
      rm -rf /tmp/prof; DCPSERVE_PROFILE_DIR=/tmp/prof DCPSERVE_PROFILE_PHASE=${PROFILE_PHASE:-decode} timeout 120 \
          python -m dcpserve.bench.engine $BENCH --num-layers 4 --dcp $d --batch 1 --input-len 4096 --output-len 40 \
          --ttft-repeats 5 ${PROFILE_EAGER:+--disable-cuda-graph} 2>&1 | tail -2 | tee -a "$LOG"
      cp /tmp/prof/profile_*.txt "$OUT/profile_${PROFILE_PHASE:-decode}_dcp$d.txt"
      cp /tmp/prof/host_*.txt "$OUT/host_${PROFILE_PHASE:-decode}_dcp$d.txt"
    done ;;
  perf)
    timeout ${PERF_TIMEOUT:-420} python -m dcpserve.bench.engine $BENCH --num-layers 4 --dcp 1,2,4 --batch 1 --input-len 4096 \
        --output-len 1536 --ttft-repeats ${TTFT_REPEATS:-5} --out "$OUT/e2e.json" --compare "${PERF_COMPARE-tp4-dcp2-a2a:dcp=2,dcp_comm=a2a;tp4-dcp4-a2a:dcp=4,dcp_comm=a2a}" \
        2>&1 | tail -9 | tee -a "$LOG" ;;
  acc)  # issue 5's accuracy table on GPU (needs the serve wheels: see docs/PERF.md section 6)
    timeout 560 python -m dcpserve.bench.accuracy_table --tp ${ACC_TP:-4} --dcp ${ACC_DCP:-1,2,4} --contexts 1024,4096,8192 \
        --num-questions ${ACC_N:-50} --num-facts 1 --parallel 25 --disable-tqdm --log-dir /tmp/acclogs \
        --extra-server-args "--attention-backend triton" --output-file "$OUT/accuracy_gpu.json" 2>&1 | tail -40 | tee -a "$LOG"
    tail -n 5 /tmp/acclogs/*.log >> "$LOG" ;;
  p2pbatch)  # decode step of the p2p collectives vs NCCL a2a at DCP = TP, by batch (4K in / 64 out)
    for b in ${P2P_BATCHES:-16 64 128}; do
      timeout ${P2PB_TIMEOUT:-150} python -m dcpserve.bench.engine $BENCH --num-layers 4 --dcp ${TP:-4} --batch $b \
          --input-len 4096 --output-len 64 --max-running-requests $(( b > 64 ? b : 64 )) --out "$OUT/p2pbatch_b$b.json" \
          --compare "a2a:dcp=${TP:-4},dcp_comm=a2a" 2>&1 | tail -3 | tee -a "$LOG"
    done ;;
  hfcmp)
    timeout 230 python -m dcpserve.bench.hf_compare --num-layers 2 --input-len 128 --output-len 64 --out "$OUT/hf.json" \
        ${HFCMP_FP8:+--fp8} 2>&1 | tail -7 | tee -a "$LOG" ;;
  prefill)
    timeout 120 python -m pytest -x -q -p no:cacheprovider tests/kernels/test_mla_prefill.py 2>&1 | tail -2 | tee -a "$LOG"
    timeout 300 python -m dcpserve.bench.kernels_prefill --sweep --out "$OUT/prefill.json" 2>&1 | tail -14 | tee -a "$LOG" ;;
  fp8)
    timeout 200 python -m pytest -x -q -p no:cacheprovider tests/kernels/test_fp8_linear.py tests/kernels/test_moe.py \
        2>&1 | tail -2 | tee -a "$LOG"
    timeout 120 python -m dcpserve.bench.kernels_fp8 --quick --out "$OUT/fp8_quick.json" 2>&1 | tail -24 | tee -a "$LOG" ;;
  esac
done
