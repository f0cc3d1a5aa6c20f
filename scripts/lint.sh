#!/usr/bin/env bash
# Lint as CI runs it: ruff (pyproject.toml) over the Python code, clang-format (.clang-format) over csrc/.
#   scripts/lint.sh          check; exit 1 if either finds something
#   scripts/lint.sh --fix    apply ruff's fixes and clang-format in place
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON_DIRS=(python tests benchmarks scripts)
mapfile -t CSRC < <(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

if [[ "${1:-}" == "--fix" ]]; then
  ruff check --fix "${PYTHON_DIRS[@]}"
  clang-format -i "${CSRC[@]}"
  exit 0
fi

status=0
echo "ruff $(ruff --version | cut -d' ' -f2): ruff check ${PYTHON_DIRS[*]}"
ruff check "${PYTHON_DIRS[@]}" || status=1

echo "$(clang-format --version | sed 's/.*version /clang-format /'): ${#CSRC[@]} files of csrc/"
violations=$(clang-format --dry-run "${CSRC[@]}" 2>&1 | grep -c 'warning: code should be clang-formatted' || true)
if [[ $violations -gt 0 ]]; then
  files=$(for f in "${CSRC[@]}"; do clang-format "$f" | cmp -s - "$f" || echo "$f"; done)
  echo "clang-format: $violations places in $(wc -l <<<"$files") files differ from .clang-format:"
  sed 's/^/  /' <<<"$files"
  echo "  (scripts/lint.sh --fix reformats them; clang-format --dry-run FILE shows where)"
  status=1
else
  echo "clang-format: csrc/ is formatted"
fi
exit $status
