#!/bin/bash
# Session 17: the first 32K timing after the build is slower than a repeat of the same settings (sessions 16
# and 17; its p90 step took 408 ms against 50 ms). Two 32K runs, each timing the defaults twice (the repeat as
# --variant residual_on=device, the CUDA default), with every step's time in the JSON (decode_ms_steps):
# (1) as is, with `top` sampled every second into top.log; (2) the 128K decode at the defaults with this
# session's code on this instance; (3) 32K again with TORCHINDUCTOR_COMPILE_THREADS=1 (no subprocess pool for
# compiled ops).
# For the device tool: carry .carry/f (the faiss wheel) and .carry/run (this script and device_lib.sh).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
(for i in \$(seq 1 400); do date +%T.%N; top -b -n1 -w 180 | sed -n 1,22p; sleep 1; done) > $RUN/out/top.log 2>&1 &
${B%128K}32K --steps 64 --warmup 4 --methods retrieval --index roar --variant residual_on=device --json $RUN/out/s32a.json > $RUN/out/s32a.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
TORCHINDUCTOR_COMPILE_THREADS=1 ${B%128K}32K --steps 64 --warmup 4 --methods retrieval --index roar --variant residual_on=device --json $RUN/out/s32b.json > $RUN/out/s32b.log 2>&1
EOS
device_poll "${1:-540}" s32a d128k s32b
