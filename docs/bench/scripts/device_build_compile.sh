#!/bin/bash
# Session 15's changes measured on a GPU host in session 16 (docs/BENCHMARKS.md, "Session 15's changes measured on
# a GPU host"): the 128K decode with one build worker and plain ops (the defaults then, pinned here since session 16
# made compiled ops and two builds the CUDA defaults) and --variant decode_compile=1 / 0 on the same prefill and
# index; the CUDA tests; offload/full for the ratios; two build workers; the old training-query count
# (--max-train-queries 16384) for the build A/B. Order: the runs needed for the targets first, then the A/Bs.
# For the device tool: carry the faiss wheel in .carry/f, this script and device_lib.sh; the first call starts the
# runs in the background, each call waits up to $1 seconds and copies the results so far to $OUT.
. "$(dirname "$0")/device_lib.sh"
R="$B --steps 64 --warmup 4 --methods retrieval --index roar --no-compile"
device_start <<EOS
$R --build-workers 1 --variant decode_compile=1 --variant decode_compile=0 --json $RUN/out/new.json > $RUN/out/new.log 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_decode_loop.py tests/test_prefill.py -k "cuda or compiled or build_workers or wait_for_builds" > $RUN/out/tests.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
$R --build-workers 2 --json $RUN/out/two_workers.json > $RUN/out/two_workers.log 2>&1
$R --build-workers 1 --max-train-queries 16384 --json $RUN/out/old_train.json > $RUN/out/old_train.log 2>&1
EOS
device_poll "${1:-540}" new ref two_workers old_train
