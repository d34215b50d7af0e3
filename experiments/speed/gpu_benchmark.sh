#!/usr/bin/env bash
# The speed issue's GPU measurements in one device call (experiments/speed/BENCHMARKS.md, "GPU"):
# the benchmark for celeba (128) and cifar10 in float32 and bfloat16, on synthetic images
# (CelebA is not here, and CIFAR-10's 139 MB exceed what a call carries), then configs/mnist.py
# on its real data, for the input pipeline beside the device-resident step.
#
# Here, once:  ../shared/device/prepare.sh mnist        (fills the git-ignored .whl/ and .data/)
# Device call: carry [".whl", ".data"], timeout_s 600 (the runs go in order of importance, each
# stopped at 150 s), command
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD TFDS_DATA_DIR=$PWD/.data || exit; bash experiments/speed/gpu_benchmark.sh
# Back in $OUT: one JSON report per run and log.txt (the tables, or why a run failed).
# Arguments are added to every run: `bash experiments/speed/gpu_benchmark.sh --windows=1
# --window_steps=1 --pipeline_batches=2 --config.batch_size=2` tries the script on a CPU.
set -u
out=${OUT:-/tmp/gpu_benchmark}
mkdir -p "$out"
python=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$python" -c 'import jax; print("jax", jax.__version__, jax.devices())'; } >> "$out/log.txt" 2>&1

run() {  # run NAME BENCHMARK_FLAGS...: $out/NAME.json, and the table or the error in log.txt
  local name=$1 dir=/tmp/gpu_benchmark_runs/$1
  shift
  echo "== $name: $*" >> "$out/log.txt"
  SECONDS=0
  timeout 150 "$python" experiments/speed/benchmark.py --output_dir="$dir" "$@" >> "$out/log.txt" 2>&1 \
    && cp "$dir/benchmark.json" "$out/$name.json"
  echo "== $name: exit status $?, $SECONDS s" >> "$out/log.txt"
}

# The issue's bar first: celeba 128's MFU in bfloat16 (goal 40%).
run celeba128_bf16 --config=configs/celeba.py --synthetic_data \
  --config.model.compute_dtype=bfloat16 "$@"
run celeba128_f32 --config=configs/celeba.py --synthetic_data "$@"
run cifar10_bf16 --config=configs/cifar10.py --synthetic_data \
  --config.model.compute_dtype=bfloat16 "$@"
run cifar10_f32 --config=configs/cifar10.py --synthetic_data "$@"
run mnist_f32 --config=configs/mnist.py --config.data_dir="${TFDS_DATA_DIR:-../shared/tensorflow_datasets}" "$@"
