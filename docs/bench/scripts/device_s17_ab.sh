#!/bin/bash
# Session 17's GPU-host run: the 128K decode with this tree (background workers that exit when idle, so their
# OpenMP teams no longer throttle the decode loop's thread wake-ups; less Python per fused call) against the
# tree of the previous commit (14891ed, unpacked by the caller into .carry/old with
# `git archive 14891ed retrieval_attention | tar -x -C .carry/old`) on the same machine; then 32K with the
# default settings timed twice (session 16 and 17 saw the first 32K timing slower than a repeat of the same
# settings); then offload / full for the same-run ratios.
# For the device tool: carry .carry/f (the faiss wheel), .carry/run (this script and device_lib.sh) and .carry/old.
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
$B --steps 64 --warmup 4 --methods retrieval --index roar --variant ef=64 --json $RUN/out/new.json > $RUN/out/new.log 2>&1
(cd .carry/old && PYTHONPATH=/tmp/site:\$PWD $B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/old.json > $RUN/out/old.log 2>&1)
${B%128K}32K --steps 64 --warmup 4 --methods retrieval --index roar --variant residual_on=device --json $RUN/out/new32k.json > $RUN/out/new32k.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
EOS
device_poll "${1:-540}" new old new32k ref
