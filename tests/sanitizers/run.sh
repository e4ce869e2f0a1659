#!/usr/bin/env bash
# Build the native module with AddressSanitizer + UBSan and run the kernel and
# format tests against it. Not part of the default test command (it needs a
# separate build and takes a few minutes); run it whenever csrc/ changes:
#
#   tests/sanitizers/run.sh [pytest args...]
#   tests/sanitizers/run.sh --fuzz tests/fuzz/fuzz_rans.py [atheris args...]
#
# The second form runs a fuzz target against the instrumented module instead.
#
# Python itself is not instrumented, so libasan is preloaded and leak
# detection is off (the interpreter keeps memory until exit by design).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build="$root/build/sanitize"
stage="$build/stage"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMMPACK_SANITIZE=ON \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build" >/dev/null
rm -rf "$stage" && mkdir -p "$stage"
cp -r "$root/mmpack" "$stage/mmpack"
cp "$build"/_native*.so "$stage/mmpack/"
asan=$(g++ -print-file-name=libasan.so)
ubsan=$(g++ -print-file-name=libubsan.so)
cd "$stage"  # python -m pytest puts the working directory first on sys.path
# The reports go to files, printed when the run ends: pytest captures the tests' stderr, and the
# abort that ends the run takes the capture with it (a run then ended in a bare exit status).
reports="$build/reports"
rm -rf "$reports" && mkdir -p "$reports"
export LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$reports/asan \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan PYTHONPATH="$stage"
show_reports() {
  local status=$?
  for report in "$reports"/*; do
    [ -e "$report" ] && { echo "== $report"; cat "$report"; } >&2
  done
  return $status
}
trap show_reports EXIT
if [ "${1:-}" = "--fuzz" ]; then
  target=$2
  shift 2
  python "$root/$target" "$@"
  exit
fi
python -m pytest -c "$root/pyproject.toml" --rootdir "$root" -p no:cacheprovider -q \
    "$root/tests/test_native.py" "$root/tests/test_transform.py" "$root/tests/test_compression.py" "$root/tests/test_fileformat.py" "$root/tests/test_modelset.py" \
    "$root/tests/test_read_kernel.py" "$root/tests/test_compression_frames.py" "$root/tests/test_bool_rows.py" \
    "$root/tests/test_changing_files.py" "$root/tests/test_golden.py" "$root/tests/test_rans.py" "$@"
