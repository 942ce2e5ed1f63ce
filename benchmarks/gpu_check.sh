#!/usr/bin/env bash
# The one command to run on a machine with a CUDA GPU (`make gpu-check`).
#
# Uses the machine's own Python with its preinstalled torch and triton (no
# virtual environment, no download), so it also runs where nothing can be
# fetched. Steps, each logged under benchmarks/results/cuda/<gpu>/:
#   1. build uan_kernels._C with CUDA kernels for this GPU's architecture, with
#      a host compiler whose extension raises errors that reach Python (the
#      system's g++ first; another compiler's C++ runtime can crash there);
#   2. the whole test suite on CUDA: first tests/test_cuda.py and the Triton
#      suite on CUDA tensors (not the interpreter), then everything else;
#   3. the benchmark table, `uan-bench --device cuda`;
#   4. the CUDA tests under compute-sanitizer memcheck and racecheck, when the
#      tool is installed (a representative subset: the tool slows every kernel);
#   5. Nsight Compute (ncu, when installed) on one training step and one eval
#      forward per backend (benchmarks/profile_step.py): kernels per step,
#      executed instructions, time and DRAM bytes of each kernel, summarised
#      in ncu-summary.md (benchmarks/ncu_summary.py).
# A summary of every step goes to summary.md; the exit status is non-zero when
# any step failed.
#
# Environment: PYTHON (default python3), CUDA_HOME (default: found from nvcc),
# CXX (a host compiler to try after the system's g++), GPU_CHECK_STEPS (default
# "build tests bench sanitizer profile"), GPU_CHECK_OUT
# (default benchmarks/results/cuda/<gpu>), GPU_CHECK_STEP_TIMEOUT (seconds per
# step, default 0: none).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
STEPS="${GPU_CHECK_STEPS:-build tests bench sanitizer profile}"
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-0}"

gpu_name="$("$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.cuda.get_device_name(0))')" || {
  echo "gpu-check: torch sees no CUDA GPU here" >&2
  exit 1
}
gpu_slug="$(echo "$gpu_name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
OUTDIR="${GPU_CHECK_OUT:-benchmarks/results/cuda/$gpu_slug}"
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.md"
status=0

if [ -z "${CUDA_HOME:-}" ]; then
  # torch can guess CUDA_HOME wrongly from a wrapper script named nvcc: take
  # the first candidate that has both the compiler and the runtime headers.
  for candidate in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      export CUDA_HOME="$candidate"
      break
    fi
  done
fi
arch="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"

{
  echo "# gpu-check on $gpu_name"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- $("$PYTHON" -c 'import torch, triton; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")' 2>&1)"
  echo "- nvcc: $("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | tail -n 1); CUDA_HOME=${CUDA_HOME:-unset}; arch $arch"
  echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  echo
  echo "| step | result | seconds | log |"
  echo "|---|---|---:|---|"
} >"$SUMMARY"

# run STEP LOG CMD...: runs CMD with its output in LOG, records the outcome.
run() {
  local step="$1" log="$2"
  shift 2
  local start=$SECONDS
  echo "gpu-check: $step ..." >&2
  timeout "$STEP_TIMEOUT" "$@" >"$OUTDIR/$log" 2>&1
  local rc=$?
  local result="ok"
  if [ $rc -ne 0 ]; then
    result="FAILED (exit $rc)"
    status=1
  fi
  local tail_line
  tail_line="$(grep -E '(passed|failed|error|ERROR SUMMARY)' "$OUTDIR/$log" | tail -n 1 | tr '|' '/')"
  echo "| $step | $result ${tail_line:+($tail_line)} | $((SECONDS - start)) | $log |" >>"$SUMMARY"
  echo "gpu-check: $step: $result $tail_line" >&2
  return $rc
}

wants() { [[ " $STEPS " == *" $1 "* ]]; }

# links_static_libstdcxx COMPILER: whether COMPILER links a shared library
# with its own static copy of libstdc++. Such a copy beside the process's
# libstdc++ crashes the first time a C++ error message formats a number (seen
# with a toolchain wrapper whose default is -static-libstdc++).
links_static_libstdcxx() {
  local probe
  probe="$(mktemp -d)"
  printf '#include <sstream>\nstd::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n' >"$probe/p.cpp"
  "$1" -shared -fPIC "$probe/p.cpp" -o "$probe/p.so" 2>/dev/null &&
    nm -C --defined-only "$probe/p.so" | grep -q '_M_insert<long>'
  local rc=$?
  rm -rf "$probe"
  return $rc
}

# errors_reach_python: whether an error the built extension raises (its
# message formats a number) reaches Python as a RuntimeError. Built with a
# compiler whose C++ runtime differs from the one the process loads, the
# extension crashes there instead, although the probe above passed (seen on
# an H200 image with a toolchain in /opt/gcc: every argument-check test
# segfaulted).
errors_reach_python() {
  "$PYTHON" - <<'EOF' >/dev/null 2>&1
import torch
from uan_kernels import ops  # noqa: F401 (registers the operators)
try:
    torch.ops.uan.gather_samples(torch.zeros(2, 3), torch.tensor([7]))
except RuntimeError:
    raise SystemExit(0)
raise SystemExit(1)
EOF
}

if wants build; then
  # Host compilers in order of preference: the system's g++ first, since its
  # libstdc++ is the one torch loads, then CXX and whatever c++ and g++ are.
  # The first whose extension passes errors_reach_python is kept.
  candidates="$(for c in /usr/bin/g++ "${CXX:-}" c++ g++; do [ -n "$c" ] && command -v "$c"; done | awk '!seen[$0]++')"
  built=""
  for compiler in $candidates; do
    if links_static_libstdcxx "$compiler"; then
      echo "| host compiler $compiler | links libstdc++ statically: not used | 0 | - |" >>"$SUMMARY"
      continue
    fi
    # nvcc compiles the .cu files' host code with CC: the C compiler beside this C++ compiler.
    c_compiler="$(dirname "$compiler")/$(basename "$compiler" | sed 's/g++$/gcc/; s/c++$/cc/')"
    run "build (CXX=$compiler)" build.log env CXX="$compiler" CC="$c_compiler" TORCH_CUDA_ARCH_LIST="$arch" \
      MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace || { cat "$SUMMARY"; exit 1; }
    if errors_reach_python; then
      echo "| errors raised by the extension reach Python | ok | 0 | - |" >>"$SUMMARY"
      built="$compiler"
      break
    fi
    echo "| errors raised by the extension reach Python | FAILED (crash): next compiler | 0 | - |" >>"$SUMMARY"
  done
  if [ -z "$built" ]; then
    echo "gpu-check: no host compiler here builds an extension whose errors reach Python" >&2
    cat "$SUMMARY"
    exit 1
  fi
fi
"$PYTHON" -c 'from uan_kernels import ops; assert ops.has_kernel("cuda"), "uan_kernels._C has no CUDA kernels"' || {
  echo "gpu-check: the extension has no CUDA kernels" >&2
  exit 1
}

PYTEST=("$PYTHON" -m pytest -p no:cacheprovider --benchmark-disable -ra)
if wants tests; then
  parallel=()
  if "$PYTHON" -c 'import xdist' 2>/dev/null; then
    parallel=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
  fi
  # The GPU kernels' own suites first, so that a run cut short still has
  # them; -v names each test's outcome as it finishes, so a log cut short
  # (no summary, no XML) still says which failed.
  gpu_suites=(tests/test_cuda.py tests/test_triton_ops.py)
  run "tests of the GPU kernels (test_cuda.py, test_triton_ops.py)" tests-gpu.log "${PYTEST[@]}" -v \
    "${parallel[@]}" "${gpu_suites[@]}" --junitxml="$OUTDIR/tests-gpu.xml"
  run "tests (everything else, on the GPU where a test takes a device)" tests.log "${PYTEST[@]}" -v \
    "${parallel[@]}" tests "${gpu_suites[@]/#/--ignore=}" --junitxml="$OUTDIR/tests.xml"
fi

if wants bench; then
  run "benchmark table (uan-bench --device cuda)" bench.log "$PYTHON" -m uan_kernels.bench --device cuda --out "$OUTDIR"
fi

if wants sanitizer; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    # The caching allocator hides out-of-bounds accesses inside its blocks.
    subset="f32 and (training_forward or eval_forward or gradients_match_reference)"
    for tool in memcheck racecheck; do
      run "compute-sanitizer $tool" "sanitizer-$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
        "${PYTEST[@]}" -q tests/test_cuda.py -k "$subset"
    done
  else
    echo "| compute-sanitizer | not installed | 0 | - |" >>"$SUMMARY"
  fi
fi

if wants profile; then
  if command -v ncu >/dev/null 2>&1; then
    metrics=launch__registers_per_thread,smsp__inst_executed.sum,gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
    for backend in cpp triton; do
      for case in "train" "eval" "train --dtype bfloat16" "train --channels-last"; do
        name="ncu-$backend-$(echo "$case" | tr -cs 'a-z0-9' '-' | sed 's/-$//').csv"
        # shellcheck disable=SC2086
        run "ncu $backend $case" "$name" env PYTHONPATH=. ncu --profile-from-start off --clock-control none --csv \
          --metrics "$metrics" "$PYTHON" benchmarks/profile_step.py --backend "$backend" --pass $case
      done
    done
    run "ncu summary" ncu-summary.log "$PYTHON" benchmarks/ncu_summary.py "$OUTDIR"
  else
    echo "| ncu | not installed | 0 | - |" >>"$SUMMARY"
  fi
fi

cat "$SUMMARY"
exit $status
