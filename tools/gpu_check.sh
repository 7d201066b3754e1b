#!/usr/bin/env bash
# tools/gpu_check.sh OUTDIR: the GPU path run for real, in one call, each step time-boxed.
#
# In a fresh temporary copy of this project (your workspace is not touched), one step after
# another, each under `timeout` with its own limit so that one failure cannot eat the time
# of the rest; a step that fails is recorded and the next one runs:
#
#   setup            dvc from WHEELS if it is not importable, a `python` first on PATH, a git
#                    identity, the copy (a git repo with one commit, DVC as the project has it)
#   pipeline         the default pipeline, whole: `dvc exp run` on the image-folder archive DATA
#   <recipe>-seed<N> each recipe of RECIPES (recipes/<recipe>.yaml, val_fraction 0) for seeds
#                    0..SEEDS-1; seeds after the first skip the ONNX/.pt2 serving files (not
#                    training time)
#   anchor-cache     checks that data/processed has the layout the peers read (else writes one;
#                    without data/processed, preprocesses DATA itself, so the peers still run)
#   airbench94, airbench94_muon
#                    the reference peers in ANCHORS, RUNS runs each (muon with COMPILE=default)
#   tests            python -m pytest -m cuda tests
#   bench            python -m imgclf.bench --device DEVICE --quick, its JSON kept
#
# OUTDIR then holds four files: summary.md (a table: step, status, wall seconds, accuracy
# mean ± std, training seconds), summary.json (all of it, per seed and per peer run), bench.json
# and logs.tar.gz (every step's log, each line stamped with the seconds since the step began,
# and each run's metrics files). Both summaries and the archive are rewritten after every
# step, so a run stopped early still leaves what it measured. The copy is kept (its path is
# printed): `dvc exp show` there lists the experiments.
#
# Environment (all optional):
#   DATA=<archive>   image-folder archive (train/<class>/, test/<class>/), default
#                    ../shared/datasets/cifar10-jpeg.tar.gz beside the project
#   DATA_MD5=<md5>   its md5 (default: that archive's); DATA_MD5= skips the check
#   WHEELS=<dir>     wheels to install (pip --no-index --no-deps --target SITE) when `import dvc`
#                    fails: a machine without network access (docs/gpu.md says how to build them)
#   SITE=/tmp/site   where those wheels go; put first on PYTHONPATH
#   ANCHORS=<dir>    folder holding airbench94_gpu.py and airbench94_muon_gpu.py, default
#                    ../shared/anchors beside the project; missing: those steps are skipped
#   RECIPES="speed muon"   the recipes run over seeds (the step is still called speed)
#   SEEDS=5          seeds of each recipe        RUNS=5     runs of each peer
#   QUICK=1          a smoke test: 1 epoch per pipeline run, 1 seed and 1 peer run (unless
#                    SEEDS or RUNS are given)
#   DEVICE=cuda      cuda | cpu: cpu is a dry run of the plumbing (train.device=cpu, peers skipped)
#   STEPS="pipeline speed anchors tests bench"   the steps to run, in this order
#   BUDGET=540       seconds for everything: a step gets its own limit or what is left, whichever
#                    is less, and is skipped with under 20 s left
#   EXTRA_ARGS=      more words for every `dvc exp run`, e.g. "-S model.width=16"
#   PYTHON=python3   the interpreter with torch
#
# Exit status: 0 if every step that ran succeeded, 1 otherwise, 2 on a usage error.
set -uo pipefail  # no -e: a failed step is recorded, and the next one runs

if [ $# -ne 1 ]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
if (( BASH_VERSINFO[0] < 5 )); then
    echo "gpu_check.sh needs bash 5 or later (EPOCHREALTIME); this is $BASH_VERSION" >&2
    exit 2
fi
SECONDS=0
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
mkdir -p "$1" && OUTDIR=$(cd "$1" && pwd) || exit 2
DATA=${DATA:-$REPO/../shared/datasets/cifar10-jpeg.tar.gz}
DATA_MD5=${DATA_MD5-da369a48cbcb5cb959d673f67ad8c0ed}
WHEELS=${WHEELS:-}
SITE=${SITE:-/tmp/site}
ANCHORS=${ANCHORS:-$REPO/../shared/anchors}
QUICK=${QUICK:-0}
[ "$QUICK" = 1 ] && few=1 || few=5
SEEDS=${SEEDS:-$few}
RUNS=${RUNS:-$few}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-pipeline speed anchors tests bench}
RECIPES=${RECIPES:-speed muon}
BUDGET=${BUDGET:-540}
PYTHON=${PYTHON:-python3}
read -ra EXTRA <<< "${EXTRA_ARGS:-}"
RESERVE=10   # seconds kept back for the summary
MIN_STEP=20  # a step is not started with less than this left

# Each step's own limit, in seconds, sized for one H200 (docs/gpu.md has the expected times).
declare -A LIMIT=([pipeline]=240 [speed-first]=150 [speed]=90 [anchor-cache]=90 [airbench94]=120
                  [airbench94_muon]=240 [tests]=240 [bench]=150)

absolute() { if [ -e "$1" ]; then (cd "$(dirname "$1")" && printf '%s/%s' "$(pwd -P)" "$(basename "$1")"); else printf '%s' "$1"; fi; }
DATA=$(absolute "$DATA")
ANCHORS=$(absolute "$ANCHORS")
[ -n "$WHEELS" ] && WHEELS=$(absolute "$WHEELS")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
LOGDIR=$WORK/logs
COPY=$WORK/project
mkdir -p "$LOGDIR" "$WORK/bin"
: > "$LOGDIR/steps.tsv"
export DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
FAILED=0

# --- Recording and running steps -----------------------------------------------------------

publish() {  # the summaries and the log archive, as they stand
    GPU_CHECK_ELAPSED=$SECONDS GPU_CHECK_BUDGET=$BUDGET "$PY" "$REPO/tools/gpu_check.py" summary "$LOGDIR" "$OUTDIR" \
        2>> "$LOGDIR/summary.err"
    tar -czf "$OUTDIR/logs.tar.gz.part" -C "$WORK" logs && mv "$OUTDIR/logs.tar.gz.part" "$OUTDIR/logs.tar.gz"
}

record() {  # record NAME STATUS RC WALL_S LIMIT_S NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$LOGDIR/steps.tsv"
    printf '%s %-18s %-8s %8s s  %s\n' "$(date +%T)" "$1" "$2" "$4" "$6"
    publish
}

stamp() {  # prefix each line with the seconds since $1 (microseconds since the epoch)
    local t0=$1 line us
    while IFS= read -r line || [ -n "$line" ]; do
        us=$(( ${EPOCHREALTIME/[.,]/} - t0 ))
        printf '[%6d.%d] %s\n' $(( us / 1000000 )) $(( us / 100000 % 10 )) "$line"
    done
}

run_step() {  # run_step NAME LIMIT COMMAND...: time-boxed, logged to LOGDIR/NAME.log, recorded
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - SECONDS - RESERVE ))
    if (( left < MIN_STEP )); then
        record "$name" skipped 0 0 0 "out of budget (${left} s left of ${BUDGET})"
        return 1
    fi
    (( limit > left )) && limit=$left
    local log=$LOGDIR/$name.log t0=${EPOCHREALTIME/[.,]/}
    { printf '$'; printf ' %q' "$@"; printf '\n'; } > "$log"
    timeout --kill-after=10 "$limit" "$@" < /dev/null 2>&1 | stamp "$t0" >> "$log"
    local rc=${PIPESTATUS[0]} ms=$(( (${EPOCHREALTIME/[.,]/} - t0) / 1000 )) status=ok note=""
    case $rc in
        0) ;;
        124|137) status=timeout note="stopped at its ${limit} s limit" ;;
        *) status=failed note="exit status $rc; see $name.log" ;;
    esac
    record "$name" "$status" "$rc" "$(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))" "$limit" "$note"
    if (( rc != 0 )); then tail -n 5 "$log" | sed 's/^/    /'; fi
    return "$rc"
}

dvc_step() {  # dvc_step NAME LIMIT ARGS...: one `dvc exp run` in the copy; its metrics files kept
    local name=$1 limit=$2
    shift 2
    (cd "$COPY" && run_step "$name" "$limit" "$PY" -m dvc exp run "${DATA_ARGS[@]}" "${DEVICE_ARGS[@]}" "$@" \
        "${QUICK_ARGS[@]}" "${EXTRA[@]}")
    local rc=$?
    if (( rc == 0 )); then
        mkdir -p "$LOGDIR/$name"
        cp "$COPY"/metrics/{train,eval,export}.json "$COPY"/metrics/train_curve.csv "$LOGDIR/$name/" 2>/dev/null
    else
        FAILED=1
    fi
    return "$rc"
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

# --- Set-up ----------------------------------------------------------------------------------

copy_project() {  # the project's files into COPY: git's list where there is one, else all but outputs
    mkdir -p "$COPY"
    if [ "$(git -C "$REPO" rev-parse --show-toplevel 2> /dev/null)" = "$REPO" ]; then
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
            | tar --null -T - -cf -) | tar -xf - -C "$COPY"
    else  # a copy of a working tree without .git: leave out what git would ignore
        tar -C "$REPO" -cf - --exclude=./.git --exclude=./.gpu --exclude=./.venv --exclude=./.gl --exclude=./.whl \
            --exclude=./data/raw --exclude=./data/processed --exclude=./data/sample --exclude=./models \
            --exclude=./metrics --exclude=./logs --exclude=./checkpoints --exclude=./dvc_plots \
            --exclude=./.dvc/cache --exclude=./.dvc/tmp --exclude=__pycache__ --exclude='*.egg-info' \
            --exclude=./.pytest_cache --exclude=./bench-out . | tar -xf - -C "$COPY"
    fi
}

setup() {
    echo "repo $REPO, work folder $WORK, outdir $OUTDIR"
    PY=$(command -v "$PYTHON") || { echo "no $PYTHON on PATH"; return 1; }
    git --version || { echo "no git: dvc exp run needs it"; return 1; }
    if ! "$PY" -c 'import dvc, dvclive, pydantic, ruamel.yaml' 2> /dev/null; then
        if [ -z "$WHEELS" ]; then
            echo "dvc, dvclive, pydantic or ruamel.yaml is missing and WHEELS is not set"
            return 1
        fi
        echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
            "$WHEELS"/*.whl || return 1
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
        # What those wheels need from the machine's own packages, where a version does not fit.
        "$PY" -m pip check 2>&1 | grep -iE 'dvc|pydantic|scmrepo|gto|hydra|celery|kombu|dulwich|pygit2|ruamel' | head -n 20
    fi
    # Stage commands run `python`: make it this interpreter. A script that execs it by its own
    # path, not a symlink: a symlink to a virtual environment's python starts the base
    # interpreter, without the environment's packages.
    printf '#!/bin/sh\nexec %q "$@"\n' "$("$PY" -c 'import sys; print(sys.executable)')" > "$WORK/bin/python"
    chmod +x "$WORK/bin/python"
    export PATH=$WORK/bin:$PATH
    if ! git config user.email > /dev/null; then  # dvc exp run commits
        export GIT_AUTHOR_NAME=gpu-check GIT_COMMITTER_NAME=gpu-check
        export GIT_AUTHOR_EMAIL=gpu-check@example.invalid GIT_COMMITTER_EMAIL=gpu-check@example.invalid
    fi
    copy_project || return 1
    export PYTHONPATH=$COPY${PYTHONPATH:+:$PYTHONPATH}  # the copy's imgclf, not an installed one
    (cd "$COPY" && git init -q && git add -A && git commit -q -m "gpu_check: the project as it was copied") || return 1
    if [ ! -f "$COPY/.dvc/config" ]; then (cd "$COPY" && "$PY" -m dvc init -q && git commit -q -am "dvc init") || return 1; fi
    echo "python: $(python -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    echo "dvc: $("$PY" -m dvc --version)"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" - "$LOGDIR/env.json" "$DEVICE" <<'EOF'
import json, platform, sys
import torch
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": sys.argv[2], "cuda_available": cuda}
if cuda:
    p = torch.cuda.get_device_properties(0)
    env |= {"device_name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version()}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)
EOF
}

PY=$(command -v "$PYTHON" || echo "$PYTHON")
echo "$(date +%T) setup"
t0=${EPOCHREALTIME/[.,]/}
setup > "$LOGDIR/setup.log" 2>&1
rc=$?
ms=$(( (${EPOCHREALTIME/[.,]/} - t0) / 1000 ))
if (( rc == 0 )); then
    record setup ok 0 "$(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))" 0 "work folder $WORK"
else
    record setup failed "$rc" "$(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))" 0 "see setup.log"
    sed 's/^/    /' "$LOGDIR/setup.log" | tail -n 20
    FAILED=1
fi

# --- The steps -------------------------------------------------------------------------------

# Quoted for DVC's -S parser, so that neither value can be read as a number.
DATA_ARGS=(-S preprocess.dataset=imagefolder -S "download.url='$DATA'" -S "download.md5='$DATA_MD5'")
DEVICE_ARGS=(-S "train.device=$DEVICE")
QUICK_ARGS=()
[ "$QUICK" = 1 ] && QUICK_ARGS=(-S train.epochs=1)

if want pipeline; then
    dvc_step pipeline "${LIMIT[pipeline]}"
fi

if want speed; then
    for recipe in $RECIPES; do
        mapfile -t ARGS < <(cd "$REPO" && "$PY" -m imgclf.recipes "$recipe" -S train.val_fraction=0 --lines)
        for (( seed = 0; seed < SEEDS; seed++ )); do
            if (( seed == 0 )); then
                dvc_step "$recipe-seed0" "${LIMIT[speed-first]}" "${ARGS[@]}" -S train.seed=0
            else
                dvc_step "$recipe-seed$seed" "${LIMIT[speed]}" "${ARGS[@]}" -S "train.seed=$seed" \
                    -S export.onnx=false -S export.pt2=false
            fi
        done
    done
fi

if want anchors; then
    CACHE=$COPY/data/processed
    if (cd "$WORK" && run_step anchor-cache "${LIMIT[anchor-cache]}" "$PY" "$REPO/tools/gpu_check.py" anchor-cache \
            "$CACHE" "$WORK/anchor-cache" --data "$DATA"); then
        [ -f "$WORK/anchor-cache/train.pt" ] && CACHE=$WORK/anchor-cache
        for peer in airbench94 airbench94_muon; do
            if [ "$DEVICE" != cuda ]; then
                record "$peer" skipped 0 0 0 "the peers run on CUDA only (DEVICE=$DEVICE)"
            elif [ ! -f "$ANCHORS/${peer}_gpu.py" ]; then
                record "$peer" skipped 0 0 0 "no $ANCHORS/${peer}_gpu.py (set ANCHORS)"
            else
                (cd "$WORK" && run_step "$peer" "${LIMIT[$peer]}" env CACHE="$CACHE" RUNS="$RUNS" COMPILE=default \
                    "$PY" "$ANCHORS/${peer}_gpu.py") || FAILED=1
            fi
        done
    else
        FAILED=1
    fi
fi

if want tests; then
    (cd "$COPY" && run_step tests "${LIMIT[tests]}" "$PY" -m pytest -m cuda tests -q -p no:cacheprovider) || FAILED=1
fi

if want bench; then
    (cd "$COPY" && run_step bench "${LIMIT[bench]}" "$PY" -m imgclf.bench --device "$DEVICE" --quick \
        --json "$OUTDIR/bench.json") || FAILED=1
fi

publish
echo
cat "$OUTDIR/summary.md"
echo
echo "$(date +%T) done in $SECONDS s; logs in $OUTDIR/logs.tar.gz; the copy and its experiments: $WORK"
exit "$FAILED"
