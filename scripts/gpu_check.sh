#!/usr/bin/env bash
# The GPU rows of every benchmark, in one go, in under 9 minutes on one H100/H200:
#
#   generate  scripts/benchmark_generate.py  SD v1.4's architecture, random weights, 512 px, 50 steps
#   train     scripts/benchmark_train.py     the training step, batch 256, 224 + 96 px crops; ViT-B/16 beside
#   loader    scripts/benchmark_loader.py    the data loader on this machine's cores
#   loop      scripts/benchmark_loop.py      the whole training loop beside loader, GPU multi-crop and step
#   probe     scripts/benchmark_probe.py     the linear probe at 100,000 x 1,000 and feature extraction
#
# and prints their rows as markdown for docs/benchmarks.md. Each part has its own time
# limit (the limits add up to 9 min), so one slow part cannot eat the others'
# time; a generate run cut short still prints the rows it finished. JSON and logs of
# every part stay in $GPU_CHECK_OUT (default: $OUT/gpu-check when $OUT is set, else a
# new temporary folder).
#
#   bash scripts/gpu_check.sh                      # on a CUDA machine
#   bash scripts/gpu_check.sh --smoke              # every part at tiny sizes on the CPU (~1 min): checks this script
#   bash scripts/gpu_check.sh --parts train,probe  # only these parts (the others' sections say "skipped")
#   bash scripts/gpu_check.sh --dry-run [--smoke]  # print each part's command line, run nothing
#
# Exit status: 0 when every part run finished, 1 when one failed or ran out of time, 2 on bad usage.
set -u -o pipefail
cd "$(dirname "$0")/.."

PARTS="generate train loader loop probe"
usage="usage: bash scripts/gpu_check.sh [--smoke] [--parts LIST] [--dry-run]   (LIST: comma-separated of: ${PARTS// /, })"
mode=gpu dry_run=0 selected="$PARTS"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) mode=smoke ;;
        --dry-run) dry_run=1 ;;
        --parts)
            [[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
            selected="${2//,/ }"
            for name in $selected; do
                [[ " $PARTS " == *" $name "* ]] || { echo "gpu_check: --parts: no part '$name'; $usage" >&2; exit 2; }
            done
            shift ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"      # works without the editable install too

out="${GPU_CHECK_OUT:-}"
if [[ $dry_run == 1 ]]; then
    out="${out:-OUT}"              # only printed
else
    if [[ -z "$out" ]]; then
        if [[ -n "${OUT:-}" ]]; then out="$OUT/gpu-check"; else out="$(mktemp -d -t gpu-check.XXXXXX)"; fi
    fi
    mkdir -p "$out"
    : > "$out/status.tsv"
fi

if [[ $dry_run == 0 && $mode == gpu ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA GPU visible; run 'bash scripts/gpu_check.sh --smoke' to check the script on a CPU" >&2
    exit 2
fi
# The random-weight SD v1.4 borrows the embedded model's tokenizer; this builds it if missing (else a no-op).
if [[ $dry_run == 0 ]]; then
    "$PYTHON" -m imagenet_sd.models.embedded models/tiny-sd > "$out/embedded.log" 2>&1 \
        || { echo "gpu_check: building models/tiny-sd failed; see $out/embedded.log" >&2; exit 1; }
fi

# part NAME LIMIT_S SCRIPT ARGS...: run one benchmark under its time limit; its JSON goes to $out/NAME.json.
part() {
    local name=$1 limit=$2 script=$3 start=$SECONDS rc
    shift 3
    if [[ " $selected " != *" $name "* ]]; then
        [[ $dry_run == 1 ]] || printf '%s\tskipped\t0\t0\n' "$name" >> "$out/status.tsv"
        return
    fi
    if [[ $dry_run == 1 ]]; then
        echo "$name $limit scripts/$script $* --json $out/$name.json"
        return
    fi
    echo "gpu_check: $name (limit ${limit} s) ..." >&2
    # timeout signals the whole process group, so the probe's and loader's child processes stop too.
    timeout --kill-after=5 "$limit" "$PYTHON" "scripts/$script" "$@" --json "$out/$name.json" \
        > "$out/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$out/status.tsv"
    echo "gpu_check: $name exited $rc after $((SECONDS - start)) s" >&2
}

if [[ $mode == gpu ]]; then
    # Sizes for one H100/H200 (estimates: no GPU was lent when they were chosen; docs/benchmarks.md):
    # generate, ~3 min: 7 rows of 4 calls at 1.5-4 s, plus one cold torch.compile (1-2 min), last, so a
    #   slow compile loses only its own row. Not here: fp32, the math kernel, batch 4 and the scheduler
    #   axis (PNDM/DDIM/DPM-Solver++ do the same UNet work); run the script's defaults for those.
    part generate 220 benchmark_generate.py --model sd-v1-4-random --device cuda --resolution 512 --steps 50 \
        --batch-sizes 1,8,16 --dtypes fp16,bf16 --attention sdpa,classic --channels-last off,on \
        --compile off,on --schedulers model --warmup 1 --repeats 3
    # train, ~50 s: ResNet-50's 6 rows (3 crop layouts x channels_last) and ViT-B/16's single-crop AdamW row
    #   (train_recipe vit_b), 5 + 20 steps each at batch 256, AMP; no compile.
    part train 60 benchmark_train.py --device cuda --batch 256 --global-size 224 --local-size 96 \
        --amp auto --warmup 5 --steps 20 --archs resnet50,timm:vit_base_patch16_224
    # loader, ~1 min: the paper's 2x224 + 6x96 crops, in-process and with 8 workers of the machine's cores.
    part loader 80 benchmark_loader.py --images 256 --local-crops 6 --workers 0,8 --repeats 3 --profile-images 0
    # loop, ~1 min: the paper recipe's 1x224 + 8x96 crops at 64 a GPU, multi-crop in 8 workers vs on the
    #   GPU, each part alone and the whole loop, with the linear head and t-ReX's (train.head).
    part loop 100 benchmark_loop.py --device cuda --images 3840 --distinct 128 --resolution 512 --batch 64 \
        --workers 8 --warmup 5 --steps 25 --heads linear,trex
    # probe, ~70 s: the torch probe on the GPU first, then scikit-learn on the CPU, cut at 25 s (its row
    #   then gives s/iter), then encoder extraction at batch 128.
    part probe 80 benchmark_probe.py --device cuda --sizes 100000x1000 --kinds torch,sklearn \
        --max-seconds 25 --extraction-batches 4 --extraction-batch 128
else
    # One thread a process: the smoke run checks the script, not speed, and on a shared machine
    # spinning OpenMP threads that compete with other jobs made it several times slower.
    export OMP_NUM_THREADS=1
    part generate 120 benchmark_generate.py --model models/tiny-sd --device cpu --resolution 64 --steps 2 \
        --batch-sizes 1,2 --dtypes fp32 --attention sdpa,classic --channels-last off,on --compile off \
        --schedulers model --warmup 0 --repeats 1 --images-per-shard 8
    part train 60 benchmark_train.py --device cpu --batch 2 --global-size 64 --local-size 48 --local-crops 1 \
        --classes 10 --amp none --warmup 0 --steps 1 --archs resnet50,timm:test_vit
    part loader 60 benchmark_loader.py --images 8 --classes 2 --per-shard 4 --size 112 --local-crops 1 \
        --workers 0 --repeats 1 --batch-size 4 --warmup-batches 0 --profile-images 0
    part loop 60 benchmark_loop.py --device cpu --images 40 --distinct 4 --resolution 64 --batch 4 \
        --global-size 32 --local-crops 1 --local-size 16 --classes 4 --workers 1 --warmup 1 --steps 2 --heads linear,trex
    part probe 60 benchmark_probe.py --device cpu --sizes 300x10 --kinds torch,sklearn --test 100 \
        --max-seconds 30 --cost-iterations 1 --extraction-batches 1 --extraction-batch 2
fi

[[ $dry_run == 1 ]] && exit 0
"$PYTHON" scripts/gpu_check_rows.py "$out" "$mode"
