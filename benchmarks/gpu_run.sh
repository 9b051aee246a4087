#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (issue 6): the gpu tests, then the full speed benchmark.
#
#   bash benchmarks/gpu_run.sh            # results in benchmarks/results/ (or $OUT when it is set)
#
# Runs from the repository root with the machine's own python3 and packages (torch, torchvision,
# safetensors, einops, tqdm, pytest, hypothesis); nothing is installed. Writes gpu-env.txt,
# gpu-tests.txt, speed-full-cuda.{json,md} and speed-cuda.log. DEVICE=cpu SPEED_ARGS="--quick ..."
# tries the script itself on a machine without a GPU.
set -uo pipefail
out="${OUT:-benchmarks/results}"
py="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
} 2>&1 | tee "$out/gpu-env.txt"

# The library's device paths, against the CPU (TF32 off); a few seconds.
SURGERY_TEST_DEVICE="$device" "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

# The full benchmark: the reference's 20,000 Adam steps measured, not extrapolated.
# shellcheck disable=SC2086  # SPEED_ARGS is a list of options
"$py" -m benchmarks.speed --device "$device" --out "$out" ${SPEED_ARGS:-} 2>&1 | tee "$out/speed-$device.log"
speed_rc=${PIPESTATUS[0]}

echo "gpu tests: exit $tests_rc; speed benchmark: exit $speed_rc"
exit $(( tests_rc || speed_rc ))
