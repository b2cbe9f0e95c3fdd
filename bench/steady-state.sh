#!/usr/bin/env bash
# Steady-state benchmark of `driftwatch check` over 1,000 tags on a local registry.
#
# What it measures: a real CNCF distribution registry (/usr/bin/docker-registry) on
# 127.0.0.1 is seeded with 1,000 distinct OCI image manifests (bench/r00..r49, t00..t19).
# driftwatch checks them once to take a baseline, then the steady-state check (nothing
# changed) runs 3 times under /usr/bin/time -v; the median run's wall time, tags/s,
# requests/tag, peak RSS and CPU are printed. A check with 0 watches shows the fixed
# start-up cost, and `hey -m HEAD -c 16` against one seeded tag gives the raw HEAD rate
# of the same registry for comparison.
#
# Run:   bench/steady-state.sh
#        DRIFTWATCH_BIN=/path/to/driftwatch bench/steady-state.sh   # skip the build
#        BENCH_KEEP=1 bench/steady-state.sh                         # keep the temp dir
# Build: CARGO_TARGET_DIR (default /work/main/target/bench, i.e. <repo>/target/bench)
#        cargo build --release --locked
# Needs: cargo, python3, /usr/bin/docker-registry, /usr/bin/hey, /usr/bin/time, curl.
# Only 127.0.0.1 is contacted. Every wait and run is bounded; the registry is killed on exit.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

REPOS=50
TAGS_PER_REPO=20
TAGS=$((REPOS * TAGS_PER_REPO))
STEADY_RUNS=3
DEAD_RUNS=7
HEY_N=5000
HEY_C=16
MANIFEST_TYPE="application/vnd.oci.image.manifest.v1+json"
RUN_TIMEOUT=300 # seconds; bound on any single check or hey run

BENCH_NAME=steady-state
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh" # die, free_port, stop_pid, start_registry_retry; REGISTRY_BIN

# ---- prerequisites -------------------------------------------------------------------
if [[ ! -x /usr/bin/time ]]; then
    echo "steady-state: /usr/bin/time is missing: apt-get install time" >&2
    exit 1
fi
[[ -x $REGISTRY_BIN ]] || die "$REGISTRY_BIN is missing: apt-get install docker-registry"
[[ -x /usr/bin/hey ]] || die "/usr/bin/hey is missing: apt-get install hey"
command -v python3 >/dev/null || die "python3 is missing"
command -v curl >/dev/null || die "curl is missing: apt-get install curl"
command -v timeout >/dev/null || die "timeout (coreutils) is missing"

# ---- build ---------------------------------------------------------------------------
if [[ -n ${DRIFTWATCH_BIN:-} ]]; then
    [[ -x $DRIFTWATCH_BIN ]] || die "DRIFTWATCH_BIN=$DRIFTWATCH_BIN is not an executable"
    BIN=$DRIFTWATCH_BIN
else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/bench}
    echo "building: CARGO_TARGET_DIR=$CARGO_TARGET_DIR cargo build --release --locked" >&2
    (cd "$ROOT" && cargo build --release --locked)
    BIN=$CARGO_TARGET_DIR/release/driftwatch
fi
echo "binary: $BIN" >&2

# ---- temp dir and cleanup ------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/driftwatch-bench.XXXXXX")
cleanup() {
    stop_pid "$REG_PID"
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        echo "kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- registry ------------------------------------------------------------------------
start_registry_retry "$TMP" quiet
HOST="127.0.0.1:$REG_PORT"
echo "registry: $HOST (pid $REG_PID)" >&2

# ---- seed ----------------------------------------------------------------------------
timeout "$RUN_TIMEOUT" python3 "$BENCH_DIR/seed.py" "http://$HOST" "$REPOS" "$TAGS_PER_REPO"

# ---- driftwatch configs --------------------------------------------------------------
CONFIG=$TMP/bench.toml
{
    printf '[daemon]\nstate = "%s"\nconcurrency = 16\n\n' "$TMP/bench.db"
    printf '[registries."%s"]\ninsecure = true\n' "$HOST"
    for r in $(seq -w 0 $((REPOS - 1))); do
        for t in $(seq -w 0 $((TAGS_PER_REPO - 1))); do
            printf '\n[[watch]]\nimage = "%s/bench/r%s:t%s"\n' "$HOST" "$r" "$t"
        done
    done
} >"$CONFIG"
EMPTY_CONFIG=$TMP/empty.toml
{
    printf '[daemon]\nstate = "%s"\nconcurrency = 16\n\n' "$TMP/empty.db"
    printf '[registries."%s"]\ninsecure = true\n' "$HOST"
} >"$EMPTY_CONFIG"

n_watch=$(grep -c '^\[\[watch\]\]' "$CONFIG")
[[ $n_watch == "$TAGS" ]] || die "config has $n_watch watches, expected $TAGS"
"$BIN" config validate --config "$CONFIG" >&2 || die "config validate failed (exit $?)"
"$BIN" config validate --config "$EMPTY_CONFIG" >&2 || die "empty config validate failed (exit $?)"

# ---- runs ----------------------------------------------------------------------------
now_ns() { date +%s%N; }

# run_check NAME CONFIG: one `check` under /usr/bin/time -v; fills WALL_NS, USER_S, SYS_S,
# RSS_KB and SUMMARY (the summary line from stderr). Fails the bench on a non-zero exit.
run_check() {
    local name=$1 cfg=$2 t0 t1 rc=0
    t0=$(now_ns)
    timeout "$RUN_TIMEOUT" /usr/bin/time -v -o "$TMP/$name.time" \
        "$BIN" check --config "$cfg" >"$TMP/$name.out" 2>"$TMP/$name.err" || rc=$?
    t1=$(now_ns)
    if [[ $rc != 0 ]]; then
        tail -n 20 "$TMP/$name.err" >&2 || true
        die "$name: driftwatch check exited $rc"
    fi
    WALL_NS=$((t1 - t0))
    USER_S=$(awk -F': ' '/User time \(seconds\)/ {print $2}' "$TMP/$name.time")
    SYS_S=$(awk -F': ' '/System time \(seconds\)/ {print $2}' "$TMP/$name.time")
    RSS_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$TMP/$name.time")
    SUMMARY=$(grep -E '^checked [0-9]+ watches' "$TMP/$name.err" | tail -n 1 || true)
    [[ -n $SUMMARY ]] || die "$name: no summary line on stderr"
    printf '%-10s wall %6.3f s  user %5.2f s  sys %5.2f s  rss %6d kB  | %s\n' \
        "$name" "$(awk -v n="$WALL_NS" 'BEGIN{printf "%.3f", n/1e9}')" \
        "$USER_S" "$SYS_S" "$RSS_KB" "$SUMMARY" >&2
}

# summary_field SUMMARY WORD: the number before WORD in the summary line.
summary_field() {
    awk -v want="$2" '{for (i = 2; i <= NF; i++) { w = $i; gsub(/[;,:]/, "", w); if (w == want) { v = $(i-1); gsub(/[^0-9]/, "", v); print v; exit } }}' <<<"$1"
}

run_check baseline "$CONFIG"
BASE_SUMMARY=$SUMMARY

declare -a S_WALL S_USER S_SYS S_RSS S_SUM
for i in $(seq 1 "$STEADY_RUNS"); do
    run_check "steady$i" "$CONFIG"
    S_WALL[i]=$WALL_NS S_USER[i]=$USER_S S_SYS[i]=$SYS_S S_RSS[i]=$RSS_KB S_SUM[i]=$SUMMARY
done
# The median run by wall time; its other figures are reported with it.
MED=$(for i in $(seq 1 "$STEADY_RUNS"); do echo "${S_WALL[i]} $i"; done | sort -n | awk -v m=$(((STEADY_RUNS + 1) / 2)) 'NR == m {print $2}')

run_check empty "$EMPTY_CONFIG"
E_WALL=$WALL_NS E_USER=$USER_S E_SYS=$SYS_S E_RSS=$RSS_KB E_SUM=$SUMMARY

# ---- a dead OTLP collector -----------------------------------------------------------
# The same steady check exporting events, metrics and spans to a closed port on 127.0.0.1:
# a collector that is down must not slow the checks down.
DEAD_CONFIG=$TMP/dead-otel.toml
{
    cat "$CONFIG"
    printf '
[otel]
endpoint = "http://127.0.0.1:%s"
protocol = "http/protobuf"
' "$(free_port)"
} >"$DEAD_CONFIG"
# The cycle time comes from check's own summary ("in 0.812 s"); the process also waits up
# to its 3 s bound at exit for the dead collector, which the wall time shows separately.
# Runs with and without the collector alternate, so that drift in the machine's load hits
# both sides alike; the medians of DEAD_RUNS pairs are compared.
cycle_s() { sed -n 's/.*; in \([0-9.]*\) s$/\1/p' <<<"$1"; }
declare -a D_WALL D_CPU D_CYCLE S_CYCLE
for i in $(seq 1 "$DEAD_RUNS"); do
    run_check "pair$i" "$CONFIG"
    S_CYCLE[i]=$(cycle_s "$SUMMARY")
    run_check "deadotel$i" "$DEAD_CONFIG"
    D_WALL[i]=$WALL_NS D_CPU[i]=$(awk -v u="$USER_S" -v s="$SYS_S" 'BEGIN{print u+s}')
    D_CYCLE[i]=$(cycle_s "$SUMMARY")
done
D_MED=$(for i in $(seq 1 "$DEAD_RUNS"); do echo "${D_CYCLE[i]} $i"; done | sort -n | awk -v m=$(((DEAD_RUNS + 1) / 2)) 'NR == m {print $2}')
S_CMED=$(for i in $(seq 1 "$DEAD_RUNS"); do echo "${S_CYCLE[i]}"; done | sort -n | awk -v m=$(((DEAD_RUNS + 1) / 2)) 'NR == m {print $1}')

# ---- hey baseline --------------------------------------------------------------------
HEY_URL="http://$HOST/v2/bench/r00/manifests/t00"
echo "hey: -m HEAD -c $HEY_C -n $HEY_N $HEY_URL" >&2
timeout "$RUN_TIMEOUT" /usr/bin/hey -m HEAD -c "$HEY_C" -n "$HEY_N" \
    -H "Accept: $MANIFEST_TYPE" "$HEY_URL" >"$TMP/hey.txt" 2>&1 || {
    cat "$TMP/hey.txt" >&2
    die "hey failed"
}
HEY_RPS=$(awk '/Requests\/sec:/ {print $2; exit}' "$TMP/hey.txt")
[[ -n $HEY_RPS ]] || { cat "$TMP/hey.txt" >&2; die "no Requests/sec in hey output"; }
HEY_CODES=$(awk '/Status code distribution:/ {on = 1; next} on && /\[[0-9]+\]/ {gsub(/^[ \t]+/, ""); gsub(/\t/, " "); printf "%s%s", sep, $0; sep = ", "} on && /^$/ && sep {exit}' "$TMP/hey.txt")

# ---- figures -------------------------------------------------------------------------
med_sum=${S_SUM[MED]}
checked=$(summary_field "$med_sum" watches)
ok=$(summary_field "$med_sum" ok)
failed=$(summary_field "$med_sum" failed)
events=$(summary_field "$med_sum" events)
requests=$(summary_field "$med_sum" registry)

echo
echo "=== driftwatch steady-state bench ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, registry $HOST) ==="
echo "baseline check:  $BASE_SUMMARY"
for i in $(seq 1 "$STEADY_RUNS"); do
    echo "steady run $i:    $(awk -v n="${S_WALL[i]}" 'BEGIN{printf "%.3f s", n/1e9}'), CPU $(awk -v u="${S_USER[i]}" -v s="${S_SYS[i]}" 'BEGIN{printf "%.2f s", u+s}'), RSS $(awk -v k="${S_RSS[i]}" 'BEGIN{printf "%.1f MB", k/1024}'); ${S_SUM[i]}"
done
awk -v wall="${S_WALL[MED]}" -v user="${S_USER[MED]}" -v sys="${S_SYS[MED]}" -v rss="${S_RSS[MED]}" \
    -v tags="$TAGS" -v req="$requests" -v checked="$checked" -v ok="$ok" -v failed="$failed" -v events="$events" \
    -v ewall="$E_WALL" -v euser="$E_USER" -v esys="$E_SYS" -v erss="$E_RSS" -v hey="$HEY_RPS" -v hc="$HEY_C" \
    -v hn="$HEY_N" -v codes="$HEY_CODES" -v runs="$STEADY_RUNS" '
BEGIN {
    w = wall / 1e9; cpu = user + sys; tps = tags / w
    printf "steady-state check, %d tags (median of %d): wall %.2f s, %.0f tags/s, %.2f requests/tag, peak RSS %.1f MB, CPU %.2f s (%.0f µs/check)\n", tags, runs, w, tps, req / tags, rss / 1024, cpu, cpu / tags * 1e6
    printf "  watches: %d checked, %d ok, %d failed; %d events; %d registry requests\n", checked, ok, failed, events, req
    printf "empty check, 0 watches: wall %.3f s, peak RSS %.1f MB, CPU %.2f s (user %.2f + sys %.2f)\n", ewall / 1e9, erss / 1024, euser + esys, euser, esys
    printf "hey -m HEAD -c %d -n %d: %.0f req/s (status %s); driftwatch/hey = %.0f %%\n", hc, hn, hey, codes, tps / hey * 100
}'
awk -v sc="$S_CMED" -v dc="${D_CYCLE[D_MED]}" -v dw="${D_WALL[D_MED]}" -v c="${D_CPU[D_MED]}" -v n="$DEAD_RUNS" 'BEGIN {
    printf "steady cycle with a dead OTLP collector (medians of %d alternating runs): %.3f s vs %.3f s without (%+.1f %%); process wall %.2f s (exit waits for the collector up to 3 s), CPU %.2f s\n", n, dc, sc, (dc - sc) / sc * 100, dw / 1e9, c
}'
if [[ $failed != 0 || $checked != "$TAGS" ]]; then
    echo "WARNING: steady-state check did not check all $TAGS watches cleanly: $med_sum" >&2
fi
