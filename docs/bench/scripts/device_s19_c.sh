#!/bin/bash
# Session 19's last GPU-host run: the CUDA stream test (kernels loaded first), then 128K at the defaults with the
# builds' GPU chunks sized by the headroom (roar.first_shrink) and their cached blocks released when the budget is
# tight (gpumem.release_if_tight): the change made after 512K ran out of memory under 24 GB. Carry .carry/f, .carry/run.
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_threads.py tests/test_gpumem.py -k "background or priority or gpumem or shrink or released or headroom" > $RUN/out/tests.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k_c.json > $RUN/out/d128k_c.log 2>&1
EOS
device_poll "${1:-540}" d128k_c
