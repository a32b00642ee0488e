#!/usr/bin/env bash
# Counts the server's user-space instructions per token event: a figure that, unlike CPU
# time, does not drift with this VM. The server runs under cachegrind (valgrind) on CPU 0
# with paced sim streams (64 tokens, 5 ms apart), the load tool on CPU 1 keeps N asks in
# flight for a fixed time, and the instructions of an idle start and stop are subtracted.
# Runs vary by about 2 % (how tokens batch depends on timing): compare builds over
# several runs each.
#
#   loadtest/instructions.sh [SERVER_BIN] [CONCURRENCY] [DURATION]
#
# Needs valgrind (`apt-get install valgrind`) and a release build of the load tool.
set -euo pipefail
bin=${1:-target/release/askstream}
conc=${2:-20}
duration=${3:-8s}
tool=target/release/loadtest
port=7811
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # run NAME CONCURRENCY -> prints the instruction count
    taskset -c 0 valgrind --tool=cachegrind --cache-sim=no \
        --cachegrind-out-file="$out/$1.cg" "$bin" --listen 127.0.0.1:$port \
        --sim-ttft-ms 0 --sim-token-ms 5 --sim-tokens 64 >"$out/$1.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 200); do
        curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
        sleep 0.2
    done
    if [ "$2" != 0 ]; then
        taskset -c 1 "$tool" --target 127.0.0.1:$port -c "$2" -d "$duration" --warmup 0s \
            --ramp 0s --no-progress >"$out/$1.load" 2>&1
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    grep -o 'I *refs: *[0-9,]*' "$out/$1.log" | tr -dc '0-9'
}

idle=$(run idle 0)
loaded=$(run loaded "$conc")
tokens=$(grep -o 'token events [0-9]*' "$out/loaded.load" | tr -dc '0-9')
echo "idle start and stop: $idle instructions"
echo "loaded: $loaded instructions, $tokens token events"
echo "per token event: $(( (loaded - idle) / tokens )) instructions"
