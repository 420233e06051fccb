#!/bin/bash
# The 128K A/B of the residual on the device vs the CPU on a lent GPU host (docs/BENCHMARKS.md, "The residual
# estimate on the device"), with narrower beams as --variant runs on the same prefill and index, then the CUDA tests
# and offload/full for the ratios (session 14; plain ops and one build worker were the defaults then, pinned here).
# For the device tool: carry the faiss wheel in .carry/f, this script and device_lib.sh; the first call starts the
# runs in the background, each call waits up to $1 seconds and copies the results so far to $OUT.
. "$(dirname "$0")/device_lib.sh"
R="$B --steps 64 --warmup 4 --methods retrieval --index roar --no-compile --build-workers 1"
V="--variant residual_on=cpu --variant ef=96 --variant ef=64 --variant residual_samples=0 --variant residual_on=device"
device_start <<EOS
$R --residual-on device $V --json $RUN/out/ab.json > $RUN/out/ab.log 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_decode_loop.py -k cuda > $RUN/out/tests.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
$R --no-align --json $RUN/out/noalign.json > $RUN/out/noalign.log 2>&1
EOS
device_poll "${1:-540}" ab ref noalign
