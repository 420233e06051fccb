#!/bin/bash
# Session 20's second GPU-host run, after device_s20.sh's retrieval runs failed (gpumem's memory-fraction query got a
# device without an index): (0) the CUDA tests of the build paths, (1) a standalone layer build with the keys
# resident (the default; also warms numba's cache), then with a copy per stage (resident_keys=false), (2) 128K at
# the defaults. Poll again with `bash .carry/run/device_s20_b.sh 540` within 30 s of a return.
# For the device tool: carry .carry/f (the faiss wheel) and .carry/run (this script and device_lib.sh).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_index.py tests/test_prune_triton.py -k "resident or cuda" > $RUN/out/tests.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 > $RUN/out/layer_build.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 resident_keys=false > $RUN/out/layer_build_copies.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
EOS
device_poll "${1:-540}" layer_build layer_build_copies d128k
