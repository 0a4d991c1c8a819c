#!/bin/bash
# Every GPU figure of docs/speed.md in one call, for a machine held by the minute:
#
#   bash bench/gpu.sh MODELS_DIR DATA_ROOT CACHE_DIR CALIBRATION_FILE LOG_DIR [DEVICE] [BATCH]
#
# MODELS_DIR holds models.json with the four lfsa surrogates and hse_faceres; DATA_ROOT an
# LFW-format folder whose crops are in CACHE_DIR (paths.cache). Stages run in order of what they
# settle, each under its own time limit, so a cut-off call still returns the first ones. Everything
# printed goes to LOG_DIR/gpu.log; the protect runs' results.json are copied there too.
# DEVICE=cpu BATCH=4 rehearses the script on a CPU, with FIT_EXTRA="data.subset.pairs=4 protect.steps=2"
# (overrides added to each protect run) to keep it short.
set -u
models=$1 data=$2 cache=$3 calibration=$4 logs=$5 device=${6:-cuda} batch=${7:-512}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
log="$logs/gpu.log"
py=${PYTHON:-python3}
runs=$(mktemp -d)  # the protect runs' folders: fresh each call, so no run resumes an earlier one

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to the log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -E "Predicting|aligning|it/s\]|img/s\]|Tip:|deprecated" | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

fit() {  # fit NAME SECONDS OVERRIDES...: experiment=protect on DATA_ROOT, results.json to the log dir
    local name=$1 limit=$2
    shift 2
    stage "$name" "$limit" "$py" -m ppfr.fit experiment=protect data.root="$data" paths.cache="$cache" \
        paths.models="$models" paths.shared="$(dirname "$models")" paths.outputs="$runs" \
        calibration_file="$calibration" logger=csv \
        seed=0 generate.batch_size="$batch" eval.batch_size="$batch" "eval.blackbox=[hse_faceres]" \
        eval.threshold_source=nearest trainer.enable_progress_bar=false run_dir="$runs/$name" "$@" ${FIT_EXTRA:-}
    cp "$runs/$name/results.json" "$logs/$name.json" 2>/dev/null
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
    "$py" -c "import torch, lightning; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'lightning', lightning.__version__)"
} 2>&1 | tee -a "$log"

bench=("--models-dir" "$models" "--device" "$device" "--batch" "$batch")
# The targets: bare ensemble and full method, both backends side by side, fp32 eager, with native
# NCHW beside them and each one's first call (cuDNN's plan setup per layout and batch shape); then
# what the per-image random draws cost.
stage protect_fp32 150 "$py" bench/protect.py "${bench[@]}" --steps 6 --repeats 3 --profile "$logs/profile_fp32.txt" \
    --backends native native-nchw onnx
stage draws 40 "$py" bench/draws.py --device "$device" --batch "$batch"
# The real job: throughput; both backends on the same faces and seeds must give the same results.
fit fit_native 120 recognizer.backend=native
fit fit_native_nchw 120 recognizer.backend=native recognizer.channels_last=false
# The lean step's candidates: bf16 autocast with cuDNN's own kernel choice, then each alone.
stage protect_bf16 120 "$py" bench/protect.py "${bench[@]}" --steps 6 --repeats 3 --bf16 --cudnn-benchmark
fit fit_onnx 150 recognizer.backend=onnx
fit fit_native_bf16 100 recognizer.backend=native trainer.precision=bf16-mixed trainer.benchmark=true
# Per model, then cuDNN's choice alone, then torch.compile on one model (compile time printed apart).
stage recognizers 120 "$py" bench/recognizers.py "${bench[@]}" --repeats 5 --bf16 --cudnn-benchmark \
    --names mobilefacenet_tf faceplugin_mobilefacenet mobilefacenet_relu6 mobileface_becauseofai hse_faceres
stage protect_cudnn 80 "$py" bench/protect.py "${bench[@]}" --steps 6 --repeats 3 --backends native --cudnn-benchmark
[ "$device" = cpu ] || stage compile 150 "$py" bench/recognizers.py "${bench[@]}" --repeats 5 --cudnn-benchmark \
    --compile --names mobilefacenet_tf
date -u | tee -a "$log"
