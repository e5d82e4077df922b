#!/usr/bin/env bash
# The transformers version matrix (tests/test_gpu_traps.py): one venv per release, each with torch,
# the oldest transformers pyproject.toml allows and the GPU image's (KINDS.md), then the cached-mode
# tests under each. Needs a package index; builds under ${MATRIX_DIR:-/tmp/diffu-matrix}.
#
#     scripts/transformers-matrix.sh [TORCH_SPEC]     # default: the torch already installed here
set -eu -o pipefail
cd "$(dirname "$0")/.."
dir=${MATRIX_DIR:-/tmp/diffu-matrix}
torch_spec=${1:-torch==$(python -c 'import torch; print(torch.__version__)')}
pythons=()
for release in $(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml) 5.17.0; do
  venv="$dir/transformers-$release"
  if [ ! -x "$venv/bin/python" ]; then
    python -m venv "$venv"
    "$venv/bin/pip" install -q "$torch_spec" "transformers==$release" numpy
  fi
  pythons+=("$venv/bin/python")
done
DIFFU_LSP_MATRIX_PYTHONS=$(IFS=:; echo "${pythons[*]}") python -m pytest -q tests/test_gpu_traps.py -k each_transformers
