#!/usr/bin/env bash
# The training benchmark on a GPU, in one go, for a lent GPU machine with no network
# (docs/BENCHMARKS.md, Training). From the repository root:
#
#   bash bench/gpu.sh            # results under $OUT (default /tmp/gpu-bench), a table printed last
#
# What it needs beside the repository: wheels of what the machine's image lacks in .whl (trl,
# datasets, dill, multiprocess, pydantic, pydantic-core, annotated-types, typing-inspection,
# typing-extensions for Python 3.12), the bundled model's tokenizer files in .gpu/tokenizer (no
# weights: the models are random-initialised Llama shapes), and tests/data (git-ignored as data/,
# so it travels only when carried): carry [".whl", ".gpu", "tests/data"]. The runs, most important first, so
# that a timeout still leaves the 1B comparison under $OUT:
#   0. the GEMM probe: the 1B shape's matmuls at batch 8's and the token budget's rows against the
#      card's peak (what MFU can reach at those sizes, whatever the trainer), seconds
#   1. 1B: this trainer against TRL's DPOTrainer (bf16, batch 8, max_length 512, HH pairs)
#   2. 1B at a token budget: 64 pairs a step, ours in micro-batches of <= 8,192 tokens, TRL at 8
#      pairs a micro-batch (as many padded tokens) times 8 accumulation steps: memory at equal batch
#   3. 1B: this trainer checkpointing every 16 steps (the write in the background): each write's
#      time on the training thread and until in place (`checkpoints`), and max_step_s against run 1's
#   4. 1B: a profile of three steady steps of this trainer (GPU-busy fraction, kernel launches per
#      step, top kernels), a short run of its own since the profiler slows the steps it watches
#   5. correctness of the packed FlexAttention path (log-probs and gradients) on the GPU
#   6. 135M: this trainer against TRL
#   7. 1B: this trainer without torch.compile'd decoder layers (compiled is the GPU default): what
#      compiling gives, and what its warm-up (timings.compile_s, outside the timed region) costs
# A step that would start after DEADLINE seconds is skipped; the table of what ran prints last.
# Neither trainer checkpoints in the timed runs; $OUT/results.json holds one object per run (--json).
# A dry run on a CPU: WHEELS=none SIZE_BIG=tiny SIZE_SMALL=tiny PAIRS_BIG=16 PAIRS_SMALL=16 PAIRS_PROFILE=64
# PAIRS_PROFILE_WARMUP=0 DEADLINE=1200 (add TOKENIZER=data/models/smollm2-135m-instruct PYTHON=.venv/bin/python).
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}
SIZE_BIG=${SIZE_BIG:-1b}
SIZE_SMALL=${SIZE_SMALL:-135m}
PAIRS_BIG=${PAIRS_BIG:-512}
PAIRS_SMALL=${PAIRS_SMALL:-256}
LIMIT=${LIMIT:-170}  # seconds per trainer process
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

WHEELS=${WHEELS:-.whl}  # WHEELS=none for a dry run where everything is installed
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
stamp() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pydantic", "triton"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", type(exc).__name__, exc)
import torch
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
} 2>&1 | tee "$OUT/env.txt"

DEADLINE=${DEADLINE:-390}  # seconds from the start after which no new step begins (the table still prints)
left() { echo $((DEADLINE - ($(date +%s) - START))); }

bench() {  # bench LABEL ARGS...: one configuration, results appended to $RESULTS
    local label=$1 budget
    shift
    budget=$(left)
    if [ "$budget" -lt 60 ]; then stamp "skip $label $* (deadline)"; return; fi
    stamp "start $label $*"
    timeout "$budget" "$PY" bench/training.py --model "$TOKENIZER" --batch-size 8 --max-length 512 \
        --timeout "$(( budget < LIMIT ? budget : LIMIT ))" --out "$RESULTS" --json "$OUT/results.json" \
        --label "$label" "$@" 2>&1 \
        | grep -v "Writing model shards" | tee -a "$LOG"
    stamp "end $label"
}

check() {
    local budget
    budget=$(left)
    if [ "$budget" -lt 40 ]; then stamp "skip check (deadline)"; return; fi
    stamp "start check"
    timeout "$(( budget < 100 ? budget : 100 ))" "$PY" bench/training.py --model "$TOKENIZER" \
        --random-init "$SIZE_BIG" --check --pairs 16 --max-length 512 --out "$RESULTS" 2>&1 \
        | grep -v "Writing model shards" | tail -5 | tee -a "$LOG"
    stamp "end check"
}

stamp "start gemm probe"
timeout 60 "$PY" bench/training.py --model "$TOKENIZER" --random-init "$SIZE_BIG" --gemm-probe \
    --gemm-rows 1024,8192 --out "$RESULTS" 2>&1 | tail -1 | tee -a "$LOG"
bench flex --random-init "$SIZE_BIG" --pairs "$PAIRS_BIG"
# The token budget: MFU is a figure of tokens per step (issue 20: >= 35% at 1B here).
bench budget --random-init "$SIZE_BIG" --pairs "$((PAIRS_BIG * 2))" --batch-size 64 --max-tokens-per-batch 8192 \
    --trl-micro-batch 8
# What a background checkpoint costs the steps around it (max_step_s against run 1's).
bench flex+checkpoints --random-init "$SIZE_BIG" --pairs "$PAIRS_BIG" --trainers ours --checkpoint-steps 16
bench profile --random-init "$SIZE_BIG" --pairs "${PAIRS_PROFILE:-96}" --trainers ours --profile-steps 3 \
    --warmup-pairs "${PAIRS_PROFILE_WARMUP:-48}"
check
bench flex --random-init "$SIZE_SMALL" --pairs "$PAIRS_SMALL"
bench flex-no-compile --random-init "$SIZE_BIG" --pairs "$PAIRS_BIG" --trainers ours --no-compile

echo
"$PY" bench/training.py --table "$RESULTS" | tee "$OUT/table.md"
stamp "done"
