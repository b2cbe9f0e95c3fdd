#!/usr/bin/env bash
# Daemon benchmark: `driftwatch run` with 10,000 watches over 1,000 tags on a 1-min schedule.
#
# What it measures: a real CNCF distribution registry (/usr/bin/docker-registry) on
# 127.0.0.1, with its request logs on, is seeded with 1,000 distinct OCI image manifests
# (bench/r00..r49, t00..t19; bench/seed.py). A config with 10,000 watches, 10 per tag
# (w00000..w09999, watch i on tag i mod 1000), all on `0 * * * * *` with jitter 0.5, is
# validated and `driftwatch run` runs for 4 full cron minutes: the first cycle is the
# baseline (bodies fetched), the next 3 are steady state (one HEAD per reference). Once a
# second /proc/<pid>/status and /proc/<pid>/stat are sampled. It reports:
#   - peak RSS (VmHWM) and steady RSS (median VmRSS over the last 2 minutes);
#   - CPU (utime+stime) per cycle, across each minute boundary; baseline apart from steady;
#   - from the registry's logs, per cycle: the requests by kind, and for the HEAD manifest
#     requests their start offsets from the tick (first, last, p50, p90) and the most
#     started in any one second;
#   - GET /v1/watches at the end: watches with outcome ok, distinct digests;
#   - the exit status after SIGTERM and how long shutdown took.
# The last line of figures (after "=== driftwatch daemon bench") is the result.
#
# Run:   bench/daemon.sh                                        # ~6 minutes
#        DRIFTWATCH_BIN=/path/to/driftwatch bench/daemon.sh     # another binary
#        WATCHES_PER_TAG=1 bench/daemon.sh                      # 1,000 watches instead
#        BENCH_KEEP=1 bench/daemon.sh                           # keep the temp dir (logs)
# Binary: DRIFTWATCH_BIN, default <repo>/target/bench/release/driftwatch; this script does
#         not build it (CARGO_TARGET_DIR=target/bench cargo build --release --locked).
# Needs: python3, /usr/bin/docker-registry, curl, jq, getconf, timeout.
# Only 127.0.0.1 is contacted. Every wait is bounded; the daemon, the sampler and the
# registry are killed on exit.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

REPOS=50
TAGS_PER_REPO=20
TAGS=$((REPOS * TAGS_PER_REPO))
WATCHES_PER_TAG=${WATCHES_PER_TAG:-10}
WATCHES=$((TAGS * WATCHES_PER_TAG))
CYCLES=${CYCLES:-4}           # cron minutes observed; the first is the baseline
SCHEDULE="0 * * * * *"
SEED_TIMEOUT=300              # seconds
READY_TIMEOUT=30              # seconds for /readyz to answer 200
SHUTDOWN_BOUND=25             # seconds; daemon.shutdown_timeout is 10 s
BIN=${DRIFTWATCH_BIN:-$ROOT/target/bench/release/driftwatch}

BENCH_NAME=daemon
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh" # die, free_port, stop_pid, start_registry_retry; REGISTRY_BIN

# ---- prerequisites -------------------------------------------------------------------
[[ -x $REGISTRY_BIN ]] || die "$REGISTRY_BIN is missing: apt-get install docker-registry"
command -v python3 >/dev/null || die "python3 is missing"
command -v curl >/dev/null || die "curl is missing: apt-get install curl"
command -v jq >/dev/null || die "jq is missing: apt-get install jq"
command -v timeout >/dev/null || die "timeout (coreutils) is missing"
[[ -x $BIN ]] || die "$BIN is not an executable: set DRIFTWATCH_BIN, or build it with" \
    "CARGO_TARGET_DIR=$ROOT/target/bench cargo build --release --locked"
[[ $WATCHES_PER_TAG =~ ^[1-9][0-9]?$ ]] || die "WATCHES_PER_TAG must be 1..99"
[[ $CYCLES =~ ^[2-9]$ ]] || die "CYCLES must be 2..9"
CLK_TCK=$(getconf CLK_TCK)
echo "binary: $BIN" >&2

# ---- temp dir and cleanup ------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/driftwatch-daemon-bench.XXXXXX")
DW_PID=""
SAMPLER_PID=""
cleanup() {
    stop_pid "$DW_PID" 12
    stop_pid "$SAMPLER_PID" 2
    stop_pid "$REG_PID"
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        echo "kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
# sleep_until EPOCH: sleeps until the wall clock reaches EPOCH (fractional), if it is ahead.
sleep_until() {
    local d
    d=$(awk -v t="$1" -v n="$(now)" 'BEGIN { d = t - n; if (d < 0) d = 0; printf "%.3f", d }')
    sleep "$d"
}

# ---- registry and seed ---------------------------------------------------------------
start_registry_retry "$TMP" access
HOST="127.0.0.1:$REG_PORT"
echo "registry: $HOST (pid $REG_PID), request logs in $TMP/registry.{log,access.log}" >&2
timeout "$SEED_TIMEOUT" python3 "$BENCH_DIR/seed.py" "http://$HOST" "$REPOS" "$TAGS_PER_REPO"

# ---- driftwatch config ---------------------------------------------------------------
DW_PORT=$(free_port)
CONFIG=$TMP/daemon.toml
{
    printf '[daemon]\nstate = "%s"\nlisten = "127.0.0.1:%s"\nschedule = "%s"\njitter = 0.5\n\n' \
        "$TMP/daemon.db" "$DW_PORT" "$SCHEDULE"
    printf '[registries."%s"]\ninsecure = true\n' "$HOST"
    awk -v host="$HOST" -v n="$WATCHES" -v tags="$TAGS" -v per_repo="$TAGS_PER_REPO" 'BEGIN {
        for (i = 0; i < n; i++) {
            t = i % tags
            printf "\n[[watch]]\nname = \"w%05d\"\nimage = \"%s/bench/r%02d:t%02d\"\n", i, host, int(t / per_repo), t % per_repo
        }
    }'
} >"$CONFIG"
n_watch=$(grep -c '^\[\[watch\]\]' "$CONFIG")
n_ref=$(grep '^image = ' "$CONFIG" | sort -u | wc -l)
[[ $n_watch == "$WATCHES" && $n_ref == "$TAGS" ]] ||
    die "config has $n_watch watches over $n_ref references, expected $WATCHES over $TAGS"
rc=0
"$BIN" config validate --config "$CONFIG" >&2 || rc=$?
[[ $rc == 0 ]] || die "driftwatch config validate exited $rc, expected 0"
echo "config: $CONFIG ($n_watch watches over $n_ref tags, schedule \"$SCHEDULE\", jitter 0.5)" >&2

# ---- daemon --------------------------------------------------------------------------
# Start well clear of a minute boundary, so the first tick after start-up is unambiguous.
sec=$(date +%-S)
if ((sec >= 45)); then
    echo "waiting $((62 - sec)) s to start clear of the minute boundary" >&2
    sleep $((62 - sec))
fi
SPAWN=$(now)
DRIFTWATCH_LOG=warn "$BIN" run --config "$CONFIG" >"$TMP/daemon.out" 2>"$TMP/daemon.log" &
DW_PID=$!
python3 "$BENCH_DIR/daemon_stats.py" sample "$DW_PID" "$TMP/samples.txt" $((CYCLES * 60 + 180)) \
    >/dev/null 2>"$TMP/sampler.log" &
SAMPLER_PID=$!
# Tick 0, the baseline cycle, is the first minute boundary after the spawn.
TICK0=$(awk -v s="$SPAWN" 'BEGIN { printf "%d", (int(s / 60) + 1) * 60 }')

ready=0
deadline=$(($(date +%s) + READY_TIMEOUT))
while (($(date +%s) < deadline)); do
    kill -0 "$DW_PID" 2>/dev/null || { tail -n 20 "$TMP/daemon.log" >&2; die "driftwatch run exited during start-up"; }
    code=$(curl -s -o "$TMP/readyz.json" -w '%{http_code}' --max-time 1 "http://127.0.0.1:$DW_PORT/readyz" || true)
    if [[ $code == 200 ]]; then ready=1; break; fi
    sleep 0.1
done
[[ $ready == 1 ]] || { tail -n 20 "$TMP/daemon.log" >&2; die "/readyz did not answer 200 within $READY_TIMEOUT s"; }
READY=$(now)
awk -v r="$READY" -v t="$TICK0" 'BEGIN { exit !(r < t - 1) }' ||
    die "ready only $(awk -v r="$READY" -v t="$TICK0" 'BEGIN { printf "%.1f", t - r }') s before the first tick"
echo "daemon: pid $DW_PID, listening on 127.0.0.1:$DW_PORT, ready after" \
    "$(awk -v r="$READY" -v s="$SPAWN" 'BEGIN { printf "%.2f", r - s }') s;" \
    "first tick $(date -u -d "@$TICK0" +%H:%M:%S) UTC, running $CYCLES cycles" >&2

# Observe CYCLES full minutes; stop 2 s before the next tick, when the last cycle's checks
# (at most half a minute of jitter plus the checks themselves) are long done.
RUN_END_AT=$((TICK0 + CYCLES * 60 - 2))
for k in $(seq 1 "$CYCLES"); do
    sleep_until $((TICK0 + k * 60 - 2))
    kill -0 "$DW_PID" 2>/dev/null || { tail -n 20 "$TMP/daemon.log" >&2; die "driftwatch run exited during cycle $k"; }
    echo "  cycle $k/$CYCLES done: $(grep -E '^Vm(RSS|HWM)' "/proc/$DW_PID/status" | tr -s ' \t' ' ' | paste -sd ' ' || true)" >&2
done
RUN_END=$(now)
HWM_BEFORE=$(awk '/^VmHWM:/ {print $2}' "/proc/$DW_PID/status")
code=$(curl -s -o "$TMP/watches.json" -w '%{http_code}' --max-time 30 "http://127.0.0.1:$DW_PORT/v1/watches" || true)
[[ $code == 200 ]] || die "GET /v1/watches answered $code"
sleep 1.2 # one more sample, after the watches listing

# ---- shutdown ------------------------------------------------------------------------
T_TERM=$(now)
kill -TERM "$DW_PID"
gone=0
for _ in $(seq 1 $((SHUTDOWN_BOUND * 50))); do
    state=$(awk '{ sub(/.*\) /, ""); print substr($0, 1, 1) }' "/proc/$DW_PID/stat" 2>/dev/null || echo gone)
    if [[ $state == gone || $state == Z ]]; then gone=1; break; fi
    sleep 0.02
done
T_GONE=$(now)
if [[ $gone == 1 ]]; then
    EXIT_STATUS=0
    wait "$DW_PID" || EXIT_STATUS=$?
else
    echo "driftwatch run still running $SHUTDOWN_BOUND s after SIGTERM; killing it" >&2
    kill -9 "$DW_PID" 2>/dev/null || true
    EXIT_STATUS=0
    wait "$DW_PID" || EXIT_STATUS=$?
fi
DW_PID=""
SHUTDOWN_S=$(awk -v a="$T_TERM" -v b="$T_GONE" 'BEGIN { printf "%.3f", b - a }')
stop_pid "$SAMPLER_PID" 2
SAMPLER_PID=""
stop_pid "$REG_PID"
REG_PID=""

# ---- figures -------------------------------------------------------------------------
echo
echo "driftwatch stderr (DRIFTWATCH_LOG=warn): $(wc -l <"$TMP/daemon.log") lines" \
    "($(grep -ci 'error' "$TMP/daemon.log" || true) mentioning error)"
head -n 5 "$TMP/daemon.log" | cut -c1-300
python3 "$BENCH_DIR/daemon_stats.py" report \
    --samples "$TMP/samples.txt" \
    --registry-log "$TMP/registry.log" \
    --access-log "$TMP/registry.access.log" \
    --watches "$TMP/watches.json" \
    --tick0 "$TICK0" --cycles "$CYCLES" --clk-tck "$CLK_TCK" --run-end "$RUN_END" \
    --hwm-before-watches "$HWM_BEFORE" \
    --exit-status "$EXIT_STATUS" --shutdown-s "$SHUTDOWN_S" \
    --n-watches "$WATCHES" --n-tags "$TAGS" \
    --schedule-desc "1-min schedule"
