#!/usr/bin/env bash
# Compile-check of the CUDA sources on a machine without a GPU (BUILD_NOTES.md,
# "CUDA sources without a GPU"): each csrc/cuda/*.cu is compiled to PTX for
# sm_90 against the CUDA headers that torch ships; nothing is linked.
#
# Usage: .ci/check_cuda.sh [PYTHON]   PYTHON: the interpreter with torch (default: python)
set -euo pipefail

PYTHON="${1:-python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda: nvcc is not on PATH" >&2
  exit 1
fi
paths="$("$PYTHON" -c 'from torch.utils import cpp_extension; print("\n".join(cpp_extension.include_paths()))')"
includes=(-I"$ROOT/csrc")
while IFS= read -r path; do
  includes+=(-I"$path")
done <<<"$paths"

shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "check_cuda: no csrc/cuda/*.cu to check" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "check_cuda: $(nvcc --version | tail -n 1); torch headers from $PYTHON"
failed=0
for source in "${sources[@]}"; do
  name="${source#"$ROOT"/}"
  start=$SECONDS
  if nvcc -ptx -arch=sm_90 -std=c++20 --expt-relaxed-constexpr -diag-suppress 3189 \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${includes[@]}" "$source" -o "$out/$(basename "$source" .cu).ptx"; then
    entries="$(grep -c '^\.visible \.entry\|^\.entry' "$out/$(basename "$source" .cu).ptx" || true)"
    echo "ok     $name -> PTX sm_90, $entries kernels, $((SECONDS - start)) s"
  else
    echo "FAILED $name ($((SECONDS - start)) s)"
    failed=1
  fi
done
exit "$failed"
