#!/usr/bin/env bash
# The GPU checks of docs/PERFORMANCE.md ("GPU figures") as one run: what the device is, the fast
# step's equivalence tests on it (CUDA, TF32/bf16, fused AdamW, torch.compile), then every bench
# line as JSON. Written for a lent machine that has PyTorch, timm and pytest but not the rest of
# this project's packages; bench and these tests need only pydantic and torch-fidelity besides.
#
#   bash clusters/gpu-check.sh --fetch-wheels    # here, once: the missing wheels into .whl/ (ignored)
#   bash clusters/gpu-check.sh [PART ...]        # there, with .whl carried; results under $OUT
#
# PARTs, run in the order given (default: xl b2 tests compare): xl (SiT-XL/2, the MFU target), b2
# (SiT-B/2), tests (the fast step's equivalence tests on the GPU), compare (needs Ray), quick (toy
# sizes on any device, to try the script). xl alone fits one 10-minute device call with room.
#
# Results: $OUT/device.txt, $OUT/tests.txt, $OUT/bench.jsonl (one JSON object a configuration),
# $OUT/compare.txt, $OUT/log.txt (everything, in order). Each step has its own time limit, so a
# slow one costs its limit and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 torch-fidelity==0.4.0"

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import pydantic, torch_fidelity" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step LIMIT_S NAME COMMAND...: run one check with its own limit, say how it ended
    local limit=$1 name=$2; shift 2
    local start=$SECONDS
    echo "=== $name: $*" >&2
    timeout "$limit" "$@"
    echo "=== $name: rc $? in $((SECONDS - start)) s" >&2
}

{ date -u; nvidia-smi 2>&1 | head -15
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
'nccl', torch.distributed.is_nccl_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} | tee "$OUT/device.txt"

bench() { step "$1" "bench $2" "$PY" -m lsep_tune.bench train "${@:3}" --json | grep --line-buffered '^{' | tee -a "$OUT/bench.jsonl"; }
lsep=(--precision bf16 --regularizers lsep)
both=(--precision bf16 --regularizers none lsep)

xl() {  # the 45% MFU target's model first
    bench 120 "XL/2 b128 eager" --model SiT-XL/2 --batch 128 --steps 40 --warmup 10 "${both[@]}"
    bench 200 "XL/2 b128 compile" --model SiT-XL/2 --batch 128 --steps 40 --warmup 20 "${lsep[@]}" --compile
    bench 90 "XL/2 b128 baseline" --model SiT-XL/2 --batch 128 --steps 40 --warmup 10 "${lsep[@]}" --baseline
    bench 60 "XL/2 b32 eager" --model SiT-XL/2 --batch 32 --steps 40 --warmup 10 "${lsep[@]}"
}
b2() {
    bench 90 "B/2 eager" --model SiT-B/2 --batch 256 --steps 40 --warmup 10 "${both[@]}"
    bench 150 "B/2 compile" --model SiT-B/2 --batch 256 --steps 40 --warmup 20 "${lsep[@]}" --compile
    bench 60 "B/2 baseline" --model SiT-B/2 --batch 256 --steps 40 --warmup 10 "${lsep[@]}" --baseline
}
tests() {  # the step's equivalence tests on the device the loop picks (cuda there)
    step 150 tests "$PY" -m pytest -q -p no:cacheprovider tests/test_train_step.py -k "reuse or window or fused or compiled" \
        2>&1 | tee "$OUT/tests.txt"
}
compare() {  # needs Ray, too large a wheel to carry: runs only where Ray is installed
    "$PY" -c "import ray" 2>/dev/null || { echo "=== compare: skipped (no ray)"; return; }
    step 300 compare "$PY" -m lsep_tune.bench train --model SiT-XL/2 --batch 128 --steps 30 --warmup 10 \
        --precision bf16 --compare | tee "$OUT/compare.txt"
}
quick() {  # toy sizes, any device: tries the script itself
    local small=(--input-size 8 --steps 2 --warmup 1 --set objective.lsep.encoder_depth=4 --set objective.lsep.crop_start=null)
    bench 300 "S/2 quick" --model SiT-S/2 --batch 2 "${both[@]}" "${small[@]}"
    bench 300 "S/2 quick baseline" --model SiT-S/2 --batch 2 "${lsep[@]}" --baseline "${small[@]}"
}

for part in "${@:-xl b2 tests compare}"; do
    for p in $part; do
        case $p in
            xl|b2|tests|compare|quick) $p ;;
            *) echo "unknown part $p (expected xl, b2, tests, compare or quick)"; exit 2 ;;
        esac
    done
done
