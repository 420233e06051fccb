#!/bin/bash
# Session 19's second GPU-host run: the background-stream test with its kernels loaded first (CUDA's lazy module
# loading synchronises the context when a kernel loads), then 128K at the defaults with the builds' streams at high
# priority (--build-priority high; the first 128K run of session 19 prefilled in 51.1 s, the next one in 39.1 s).
# Carry .carry/f and .carry/run.
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_threads.py -k "background or priority" > $RUN/out/tests.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-priority high --json $RUN/out/d128k_hi.json > $RUN/out/d128k_hi.log 2>&1
EOS
device_poll "${1:-540}" d128k_hi
