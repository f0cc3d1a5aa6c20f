#!/usr/bin/env bash
# The CPU code under AddressSanitizer and UndefinedBehaviorSanitizer (issue 10): builds danlu with
# DANLU_SANITIZE=address,undefined and CUDA off into build/sanitize/site (its own build folder beside the
# normal one), then runs pytest on that build with the sanitizer runtimes preloaded, since python itself is
# not instrumented. The first report aborts the run (UBSan too: -fno-sanitize-recover), so the exit is non-zero.
#
#   scripts/sanitized_tests.sh [PYTEST_ARGS...]
#
# Default selection: the optimizer, BatchNorm and dropout tests, and tests/test_memory_safety.py when it exists,
# less the hypothesis searches and the cases on 2^26-element tensors (under ASan those take minutes, and the
# fixed-shape tests reach the same code).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CXX=${CXX:-c++}
SITE=build/sanitize/site

DANLU_CUDA=OFF DANLU_SANITIZE=address,undefined "$PYTHON" -m pip install --quiet --disable-pip-version-check \
  --no-deps --upgrade --target "$SITE" -C build-dir="build/sanitize/{wheel_tag}" -C install.strip=false .

if [[ $# -eq 0 ]]; then
  set -- tests/test_optim.py tests/test_batch_norm.py tests/test_dropout.py
  [[ -f tests/test_memory_safety.py ]] && set -- "$@" tests/test_memory_safety.py
  set -- "$@"
fi

# The runtimes of the compiler that built the module, loaded before anything else in the process.
runtime() {
  local path; path=$("$CXX" -print-file-name="$1")
  [[ -f "$path" ]] || { echo "sanitized_tests: $CXX has no $1" >&2; exit 2; }
  echo "$path"
}
export LD_PRELOAD="$(runtime libasan.so):$(runtime libubsan.so)${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: python and torch keep allocations until exit by design. allocator_may_return_null=1: tests
# that ask torch for impossible sizes get torch's error instead of an ASan abort.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=0:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
export DANLU_HYPOTHESIS_PROFILE=${DANLU_HYPOTHESIS_PROFILE:-ci}

"$PYTHON" - <<'PY'
from danlu import _C
info = _C.build_info()
assert info["sanitize"], f"the danlu on the path is not the sanitized build: {_C.__file__}"
print(f"sanitized_tests: {_C.__file__} built with -fsanitize={','.join(info['sanitize'])}")
PY
# --capture=sys: a report is written to file descriptor 2 by the runtime, which then exits; pytest's default
# capture of the descriptors would swallow it.
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys "$@"
