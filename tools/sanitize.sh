#!/usr/bin/env bash
# Builds libktmoe with ASan + UBSan and runs the C tests and the Python layer
# tests against it.  Usage: tools/sanitize.sh [pytest args...]
# Needs: meson, ninja, gcc, and an installed ktmoe (pip install .) for the
# Python part, whose library is swapped for the sanitized one via
# KTMOE_LIBRARY.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build-sanitize
if [ ! -d "$build" ]; then
  meson setup "$build" -Dbuildtype=debugoptimized -Db_sanitize=address,undefined \
    -Db_lundef=false >/dev/null
fi
meson compile -C "$build" >/dev/null
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 meson test -C "$build" --print-errorlogs

# Python under ASan: the runtime must be loaded first; Python itself leaks by
# design, so leak checking is off.
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export KTMOE_LIBRARY="$PWD/$build/libktmoe/libktmoe.so"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
if [ $# -eq 0 ]; then
  set -- -q -x tests/test_sft_layer.py tests/test_sft_errors.py tests/test_quant_sft.py \
    tests/test_int8_activations.py tests/test_inference.py tests/test_loaders.py \
    tests/test_skip_lora.py tests/test_lowbit_sft.py -k "not cuda"
fi
LD_PRELOAD="$asan $ubsan" python -m pytest -p no:cacheprovider "$@"
