#!/usr/bin/env bash
# Every measurement vlprune needs a GPU for, in one command that ends within 8 minutes on one H100 or H200:
#
#   bash benchmarks/gpu.sh [OUT_FOLDER]          # default: gpu-results/<UTC date and time>
#   bash benchmarks/gpu.sh --smoke OUT_FOLDER    # the same steps on the CPU at toy sizes (seconds): checks the wiring
#
# Steps, each with its own time limit so that one slow or failing step never costs the others theirs:
#   env          GPU, driver, Python and package versions
#   kernels      the Triton kernels against the PyTorch sequences they replace (LLaVA-1.5-7B shapes, batch 1 and 16)
#   prefill-b1   eager prefill, pruned against unpruned, LLaVA-1.5-7B shapes (random weights), bf16, batch 1
#   prefill-b8   the same at batch 8
#   captured-b1  captured prefill, first token and 32-token answer (inductor with CUDA graphs, the default), batch 1
#   captured-b8  the same at batch 8, with torch's `cudagraphs` backend (CUDA graphs without inductor's code
#                generation: it compiles in seconds where inductor takes a minute or more per graph at these shapes)
#   throughput   captured decode throughput at batches 1, 8, 32 and 64, unpruned against FasterVLM keeping 64
#                (`cudagraphs` backend, for the same reason: 16 graphs)
#   cuda-tests   VLPRUNE_TEST_DEVICE=cuda pytest over the engine, pruner, statistics and kernel tests
#
# Each step writes <step>.md (its table: stdout) and <step>.log (stderr) into the folder; summary.md lists every step
# with its exit status and seconds (124: it ran out of time). docs/benchmarks.md says which numbers are still
# unmeasured: run this whenever a GPU is at hand and copy the tables there with the date and the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
  shift
fi
out=${1:-gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if ((smoke)); then
  device=cpu dtype=float32 preset=tiny batches=1,2 repeats=1 keep=4 big_batch=2
  first_backend=eager graph_backend=eager
  limits=(60 60 60 60 60 60 60)
else
  device=cuda dtype=bfloat16 preset=llava-1.5-7b batches=1,8,32,64 repeats=3 keep=64 big_batch=8
  first_backend=inductor graph_backend=cudagraphs
  # Seconds per step, in the order below; with the environment's few seconds they stay inside the 8 minutes.
  limits=(40 45 50 120 70 90 60)
fi

echo "| step | exit status | seconds |" > "$out/summary.md"
echo "|---|---|---|" >> "$out/summary.md"

step() {  # step NAME LIMIT COMMAND...: run COMMAND with a time limit, its table to NAME.md, its log to NAME.log
  local name=$1 limit=$2 start status
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit} s): $*" | tee -a "$out/commands.txt"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.md" 2> "$out/$name.log"
  status=$?
  echo "| $name | $status | $(($(date +%s) - start)) |" >> "$out/summary.md"
  tail -n 3 "$out/$name.log" | sed "s/^/   $name: /"
}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$python" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  "$python" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
} > "$out/env.md" 2> "$out/env.log"
cat "$out/env.md"

prefill=("$python" benchmarks/prefill.py --preset "$preset" --device "$device" --dtype "$dtype" --repeats "$repeats")
step kernels "${limits[0]}" "$python" benchmarks/kernel_speed.py --device "$device" --dtype "$dtype" \
  --repeats $((smoke ? 2 : 50))
step prefill-b1 "${limits[1]}" "${prefill[@]}" --batch 1 --methods fastv,fastervlm,divprune,visionzip,random \
  --keep "$keep"
step prefill-b8 "${limits[2]}" "${prefill[@]}" --batch "$big_batch" --methods fastv,fastervlm,divprune,random \
  --keep "$keep"
step captured-b1 "${limits[3]}" "${prefill[@]}" --batch 1 --compile --methods fastervlm --keep "$keep" \
  --backend "$first_backend"
step captured-b8 "${limits[4]}" "${prefill[@]}" --batch "$big_batch" --compile --methods fastervlm --keep "$keep" \
  --backend "$graph_backend"
step throughput "${limits[5]}" "$python" benchmarks/throughput.py --preset "$preset" --device "$device" \
  --dtype "$dtype" --methods fastervlm --keep "$keep" --batches "$batches" --answer 16 --repeats 2 \
  --plot "$out/throughput.png" --backend "$graph_backend"
if ((smoke)); then
  echo "| cuda-tests | skipped (--smoke) | 0 |" >> "$out/summary.md"
else
  step cuda-tests "${limits[6]}" env VLPRUNE_TEST_DEVICE=cuda "$python" -m pytest -q -x -p no:cacheprovider \
    tests/test_triton_kernels.py tests/test_stats.py tests/test_engine.py tests/test_invariants.py tests/test_pruners.py
fi

echo
cat "$out/summary.md"
echo "tables and logs in $out"
