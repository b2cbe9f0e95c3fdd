# Shared helpers of the bench scripts (steady-state.sh, daemon.sh); sourced, not run.
#
# The sourcing script sets BENCH_NAME (the prefix of error messages) first. Provides:
#   die MSG...                  print "BENCH_NAME: MSG" to stderr and exit 1
#   free_port                   an unused TCP port on 127.0.0.1
#   stop_pid PID [SECS]         SIGTERM, wait up to SECS (default 5), then SIGKILL; reaps it
#   start_registry DIR MODE     one attempt to start /usr/bin/docker-registry on 127.0.0.1,
#                               storage and logs in DIR; MODE "quiet" (errors only, no access
#                               log) or "access" (access log on stdout, DIR/registry.access.log,
#                               and a JSON line per request on stderr, DIR/registry.log).
#                               Sets REG_PORT and REG_PID; returns 1 if GET /v2/ did not
#                               answer 200 within 10 s.
#   start_registry_retry DIR MODE   three attempts of start_registry (a free port can be
#                               taken between choosing and binding it); dies otherwise.
# Uses REGISTRY_BIN (default /usr/bin/docker-registry). Only 127.0.0.1 is ever contacted.

REGISTRY_BIN=${REGISTRY_BIN:-/usr/bin/docker-registry}
REG_PID=""
REG_PORT=""

# Loopback traffic must never go through a proxy.
export NO_PROXY=127.0.0.1 no_proxy=127.0.0.1
unset HTTP_PROXY http_proxy HTTPS_PROXY https_proxy ALL_PROXY all_proxy

die() { echo "${BENCH_NAME:-bench}: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

stop_pid() {
    local pid=$1 secs=${2:-5}
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

start_registry() {
    local dir=$1 mode=$2 code
    REG_PORT=$(free_port)
    mkdir -p "$dir/storage"
    {
        echo "version: 0.1"
        echo "log:"
        case $mode in
        quiet)
            printf '  level: error\n  accesslog:\n    disabled: true\n' ;;
        access)
            # The access log (combined format, start time to the second) goes to stdout; at
            # level info the registry also logs "response completed" per request on stderr,
            # as JSON with an RFC 3339 nanosecond completion time and the duration.
            printf '  level: info\n  formatter: json\n  accesslog:\n    disabled: false\n' ;;
        *)
            die "start_registry: unknown mode $mode" ;;
        esac
        cat <<EOF
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$REG_PORT
EOF
    } >"$dir/registry.yml"
    "$REGISTRY_BIN" serve "$dir/registry.yml" >"$dir/registry.access.log" 2>"$dir/registry.log" &
    REG_PID=$!
    for _ in $(seq 1 100); do
        if ! kill -0 "$REG_PID" 2>/dev/null; then
            wait "$REG_PID" 2>/dev/null || true
            REG_PID=""
            return 1
        fi
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$REG_PORT/v2/" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    stop_pid "$REG_PID"
    REG_PID=""
    return 1
}

start_registry_retry() {
    local dir=$1 mode=$2
    for _ in 1 2 3; do
        start_registry "$dir" "$mode" && return 0
        echo "registry did not start on port $REG_PORT; retrying:" >&2
        tail -n 5 "$dir/registry.log" >&2 || true
    done
    die "registry did not start after 3 attempts"
}
