#!/usr/bin/env bash
# The GPU measurements of issue 13 in one call (about 4 minutes on an H200): the benchmark pair (ResNet-50 1024²
# b2, VGG-16 896² b2), ResNet-50 at 4096² and 8192² beside the plain model, and the gigapixel steps (8192²,
# 16384²). PyTorch's default precision: TF32 convolutions (cuDNN). With TF32 switched off, cuDNN picks a forward
# algorithm with a 33 GiB workspace for VGG-16 at 896² (plain peak 35.5 GiB against 2.3 GiB), which makes the
# plain baseline meaningless. New records are appended to docs/*.jsonl; the new lines and the log are copied to
# $OUT (default /tmp/lrcnn_gpu).
#
# Groups (default: bench gigapixel): auto (mode="auto" under a budget at 4096² and 8192², about 5 minutes),
# profile (scripts/gpu_profile.py, under a minute).
#
#     bash scripts/gpu.sh                   # needs CUDA; run from the repository root
#     bash scripts/gpu.sh auto profile
set -u
groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(bench gigapixel)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lrcnn_gpu}
mkdir -p "$out"
b0=$(wc -l <docs/benchmarks.jsonl); s0=$(wc -l <docs/scale.jsonl)
save() {
    tail -n +$((b0 + 1)) docs/benchmarks.jsonl >"$out/benchmarks.new.jsonl"
    tail -n +$((s0 + 1)) docs/scale.jsonl >"$out/scale.new.jsonl"
}
step() {  # step SECONDS command...
    local limit=$1; shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | grep -v Warning
    echo "=== rc ${PIPESTATUS[0]}"
    save
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'tv', torchvision.__version__, 'lightning', lightning.__version__, 'tf32', torch.backends.cudnn.allow_tf32)"
    for group in "${groups[@]}"; do
        case $group in
        bench)
            step 60 python3 scripts/bench.py --device cuda --model resnet50 --sizes 1024 --batch 2 --repeats 5 \
                --methods plain,checkpoint,2ps:16,overl:16,overl:48
            step 60 python3 scripts/bench.py --device cuda --model vgg16 --sizes 896 --batch 2 --repeats 5 \
                --methods plain,checkpoint,2ps:16,overl:16,overl:48
            step 100 python3 scripts/bench.py --device cuda --model resnet50 --sizes 4096 --batch 1 --repeats 3 \
                --methods plain,2ps:16,overl:16,overl:64
            step 75 python3 scripts/bench.py --device cuda --model resnet50 --sizes 8192 --batch 1 --repeats 1 \
                --methods plain,overl:64
            ;;
        gigapixel)
            step 45 python3 scripts/gigapixel.py --device cuda --side 8192 --method overl:64 --check 512
            step 60 python3 scripts/gigapixel.py --device cuda --side 16384 --method overl:64 --check 0
            ;;
        auto)
            step 100 python3 scripts/bench.py --device cuda --model resnet50 --sizes 4096 --batch 1 --repeats 3 \
                --methods plain,overl:16,auto --auto-budget 0.1
            step 200 python3 scripts/bench.py --device cuda --model resnet50 --sizes 8192 --batch 1 --repeats 1 \
                --methods plain,auto --auto-budget 0.05
            ;;
        profile)
            step 60 python3 scripts/gpu_profile.py
            ;;
        *) echo "unknown group $group (bench, gigapixel, auto, profile)" ;;
        esac
    done
} 2>&1 | tee "$out/gpu.log"
