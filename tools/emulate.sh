#!/usr/bin/env bash
# Builds libktmoe with the avx512 and amx tiers compiled against their
# portable emulation (meson option emulate=true: AVX2 flags only, see
# libktmoe/src/kernels/emu/kt_emu.h), checks that both tiers are reported
# usable and emulated, and runs the C tests and the Python layer/inference
# tests of those two tiers against it.  Works on any AVX2 CPU; emulated AMX
# is slow, so the Python part keeps to the avx512/amx cases of the small
# layer tests (about 3 minutes on 2 cores).
# Usage: tools/emulate.sh [pytest args...]
# Needs: meson, ninja, gcc, and an installed ktmoe (pip install .) for the
# Python part, whose library is swapped for the emulated one via
# KTMOE_LIBRARY.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build-emulate
if [ ! -d "$build" ]; then
  meson setup "$build" -Dbuildtype=release -Demulate=true >/dev/null
fi
meson compile -C "$build" >/dev/null
meson test -C "$build" --print-errorlogs

export KTMOE_LIBRARY="$PWD/$build/libktmoe/libktmoe.so"
python - <<'PY'
import os, ktmoe
info = ktmoe.cpu_info()
assert os.path.samefile(info["library"], os.environ["KTMOE_LIBRARY"]), info["library"]
for tier in ("avx512", "amx"):
    assert tier in info["usable_tiers"], f"{tier} not usable in the emulation build: {info}"
assert info["emulated_tiers"] == ["avx512", "amx"], info["emulated_tiers"]
print("usable:", info["usable_tiers"], "emulated:", info["emulated_tiers"], "selected:", info["selected_tier"])
PY
if [ $# -eq 0 ]; then
  set -- -q -x tests/test_sft_layer.py tests/test_quant_sft.py tests/test_lowbit_sft.py \
    tests/test_skip_lora.py tests/test_inference.py tests/test_int8_activations.py \
    -k "(amx or avx512) and not cuda"
fi
# KTMOE_ZMM=1: the avx512 tier's 512-bit panel kernels, also on CPUs where
# they are not its default
KTMOE_ZMM=1 python -m pytest -p no:cacheprovider "$@"
