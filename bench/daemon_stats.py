#!/usr/bin/env python3
"""Sampling and figures for bench/daemon.sh.

  daemon_stats.py sample PID OUT [MAX_SECONDS]
      Once per second, on the whole second, appends "EPOCH VmRSS_kB VmHWM_kB TICKS UTIME
      STIME" to OUT, where TICKS = UTIME + STIME of the process (all its threads) in clock
      ticks, read from
      /proc/PID/status and /proc/PID/stat. Stops when the process is gone (or a zombie), or
      after MAX_SECONDS (default 1200).

  daemon_stats.py report --samples F --registry-log F --access-log F --watches F
                         --tick0 EPOCH --cycles N --clk-tck HZ --run-end EPOCH
                         --hwm-before-watches KB --exit-status RC --shutdown-s S
                         --n-watches N --n-tags N --schedule-desc TEXT
      Prints the per-cycle detail and the final labelled block.

Request start times come from the registry's JSON "response completed" lines (completion
time with nanoseconds minus the logged duration); the access log (start time to the
second) is used as a cross-check of the per-minute counts and of the burstiness.

Standard library only.
"""

import argparse
import calendar
import json
import math
import re
import statistics
import sys
import time
from collections import Counter, defaultdict


# ---- sampling -----------------------------------------------------------------------------

def read_proc(pid: int):
    """(rss_kb, hwm_kb, ticks, utime, stime) or None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    rest = stat[stat.rindex(")") + 2:].split()
    state = rest[0]  # field 3
    if state in ("Z", "X"):
        return None
    utime, stime = int(rest[11]), int(rest[12])  # fields 14 and 15
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    if "VmRSS" not in fields or "VmHWM" not in fields:
        return None
    return fields["VmRSS"], fields["VmHWM"], utime + stime, utime, stime


def sample(pid: int, out: str, max_seconds: float) -> None:
    deadline = time.time() + max_seconds
    with open(out, "a", buffering=1) as f:
        while time.time() < deadline:
            now = time.time()
            time.sleep(math.ceil(now) - now if math.ceil(now) > now else 1.0)
            got = read_proc(pid)
            if got is None:
                return
            f.write(f"{time.time():.3f} {' '.join(map(str, got))}\n")


# ---- parsing ------------------------------------------------------------------------------

RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$"
)
GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|μs|ms|s|m|h)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MONTHS = {m: i for i, m in enumerate(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1)}
ACCESS = re.compile(
    r'^\S+ \S+ \S+ \[(\d\d)/(\w{3})/(\d{4}):(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\] "(\S+) (\S+) [^"]*" (\d{3}) '
)


def parse_rfc3339(text: str) -> float:
    m = RFC3339.match(text)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    y, mo, d, h, mi, s, frac, zone = m.groups()
    t = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s)))
    if frac:
        t += int(frac) / 10 ** len(frac)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        t -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return t


def parse_go_duration(text: str) -> float:
    pos, total = 0, 0.0
    for m in GO_DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * GO_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a Go duration: {text!r}")
    return total


def kind_of(method: str, uri: str) -> str:
    path = uri.split("?", 1)[0]
    if path in ("/v2/", "/v2"):
        return f"{method} /v2/"
    for part in ("manifests", "blobs", "referrers", "tags"):
        if f"/{part}/" in path:
            return f"{method} {part}"
    return f"{method} other"


def registry_requests(path: str):
    """[(start_epoch, kind, status)] from the registry's JSON request log."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not str(e.get("msg", "")).startswith("response completed"):
                continue
            end = parse_rfc3339(e["time"])
            dur = parse_go_duration(e.get("http.response.duration", "0s"))
            out.append((end - dur, kind_of(e["http.request.method"], e["http.request.uri"]),
                        int(e.get("http.response.status", 0))))
    return out


def access_requests(path: str):
    """[(start_second_epoch, kind, status)] from the combined-format access log."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m = ACCESS.match(line)
            if not m:
                continue
            dd, mon, yyyy, hh, mm, ss, sign, zh, zm, method, uri, status = m.groups()
            t = calendar.timegm((int(yyyy), MONTHS[mon], int(dd), int(hh), int(mm), int(ss)))
            t -= (1 if sign == "+" else -1) * (int(zh) * 3600 + int(zm) * 60)
            out.append((t, kind_of(method, uri), int(status)))
    return out


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# ---- report -------------------------------------------------------------------------------

def report(a) -> int:
    problems = []
    tick0, cycles = a.tick0, a.cycles
    ticks_at = [tick0 + 60 * k for k in range(cycles + 1)]

    # Samples.
    samples = []
    with open(a.samples) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 6:
                samples.append((float(parts[0]),) + tuple(int(x) for x in parts[1:]))
    if len(samples) < 10:
        print(f"daemon: only {len(samples)} samples", file=sys.stderr)
        return 1
    peak_kb = max(s[2] for s in samples)

    def cpu_at(t, field=3):
        """utime+stime (field 3; 4 utime, 5 stime) in s of the last sample taken before t."""
        before = [s for s in samples if s[0] < t]
        return before[-1][field] / a.clk_tck if before else None

    cpu, cpu_split = [], []
    for k in range(cycles):
        lo, hi = ticks_at[k], min(ticks_at[k + 1], a.run_end)
        start, end = cpu_at(lo), cpu_at(hi)
        cpu.append(None if start is None or end is None else end - start)
        cpu_split.append(None if start is None or end is None else
                         (cpu_at(hi, 4) - cpu_at(lo, 4), cpu_at(hi, 5) - cpu_at(lo, 5)))
    startup_cpu = cpu_at(ticks_at[0])
    idle_rss = [s[1] for s in samples if s[0] < ticks_at[0]]
    steady_from = max(tick0, a.run_end - 120)
    steady_rss = [s[1] for s in samples if steady_from <= s[0] <= a.run_end]
    steady_rss_kb = statistics.median(steady_rss) if steady_rss else float("nan")
    rss_by_cycle = []
    for k in range(cycles):
        in_cycle = [s[1] for s in samples if ticks_at[k] <= s[0] < min(ticks_at[k + 1], a.run_end)]
        rss_by_cycle.append((min(in_cycle), max(in_cycle)) if in_cycle else (0, 0))

    # Registry requests, grouped by the minute in which they started.
    reqs = registry_requests(a.registry_log)
    access = access_requests(a.access_log)
    by_minute = defaultdict(list)
    for start, kind, status in reqs:
        by_minute[int(start // 60) * 60].append((start, kind, status))
    access_by_minute = defaultdict(list)
    for start, kind, status in access:
        access_by_minute[int(start // 60) * 60].append((start, kind, status))

    print()
    print(f"registry requests by minute of their start (tick0 = "
          f"{time.strftime('%H:%M:%S', time.gmtime(tick0))} UTC; JSON request log, access log in brackets):")
    for minute in sorted(set(by_minute) | set(access_by_minute)):
        k = (minute - tick0) // 60
        label = (f"cycle {k + 1}" if 0 <= k < cycles else "before" if k < 0 else "after")
        kinds = Counter(kind for _, kind, _ in by_minute.get(minute, []))
        akinds = Counter(kind for _, kind, _ in access_by_minute.get(minute, []))
        statuses = Counter(st for _, _, st in by_minute.get(minute, []))
        desc = ", ".join(f"{n} {kind} [{akinds.get(kind, 0)}]" for kind, n in sorted(kinds.items()))
        extra = ", ".join(f"{kind} [{n}]" for kind, n in sorted(akinds.items()) if kind not in kinds)
        print(f"  {time.strftime('%H:%M', time.gmtime(minute))} {label:>8}: "
              f"{desc}{'; access log only: ' + extra if extra else ''}; "
              f"status {dict(sorted(statuses.items()))}")
    bad = [(t, kind, st) for t, kind, st in reqs
           if st >= 400 and tick0 <= t < ticks_at[-1]]
    if bad:
        problems.append(f"{len(bad)} registry requests answered >= 400 during the run")

    # Spread of the HEAD manifest requests of each cycle.
    spread = []  # per cycle: (n, first, last, p50, p90, burst, busy_seconds, access_n, access_burst)
    for k in range(cycles):
        offs = sorted(t - ticks_at[k] for t, kind, _ in by_minute.get(ticks_at[k], [])
                      if kind == "HEAD manifests")
        acc = [t for t, kind, _ in access_by_minute.get(ticks_at[k], []) if kind == "HEAD manifests"]
        if not offs:
            spread.append(None)
            continue
        per_second = Counter(int(o) for o in offs)
        acc_per_second = Counter(acc)
        spread.append((len(offs), offs[0], offs[-1], percentile(offs, 50), percentile(offs, 90),
                       max(per_second.values()), len(per_second), len(acc),
                       max(acc_per_second.values()) if acc_per_second else 0, offs))

    print()
    print("per cycle (CPU = utime+stime across the minute; offsets of HEAD manifest starts from second 0):")
    for k in range(cycles):
        name = "baseline" if k == 0 else "steady"
        c = ("n/a" if cpu[k] is None else
             f"{cpu[k]:.2f} s (user {cpu_split[k][0]:.2f}, sys {cpu_split[k][1]:.2f})")
        lo, hi = rss_by_cycle[k]
        line = f"  cycle {k + 1} ({name:8}): CPU {c}, RSS {lo / 1024:.1f}-{hi / 1024:.1f} MB"
        sp = spread[k]
        if sp is None:
            line += "; no HEAD manifest requests"
        else:
            n, first, last, p50, p90, burst, busy, acc_n, acc_burst, _ = sp
            line += (f"; {n} HEAD [{acc_n}], first {first:.2f} s, last {last:.2f} s, "
                     f"p50 {p50:.2f} s, p90 {p90:.2f} s, max {burst}/s [{acc_burst}], "
                     f"{busy} busy seconds")
        print(line)
    if startup_cpu is not None and idle_rss:
        print(f"  start-up to tick0 (config loaded, no check yet): CPU {startup_cpu:.2f} s, "
              f"RSS {statistics.median(idle_rss) / 1024:.1f} MB")

    # Watches.
    with open(a.watches) as f:
        watches = json.load(f)["watches"]
    outcomes = Counter(str(w.get("outcome")) for w in watches)
    digests = {w.get("digest") for w in watches if w.get("digest")}
    failing = [w for w in watches if w.get("outcome") != "ok"]
    print()
    print(f"GET /v1/watches: {len(watches)} watches, outcomes {dict(outcomes)}, "
          f"{len(digests)} distinct digests, "
          f"{sum(1 for w in watches if w.get('consecutive_failures'))} with consecutive failures")
    for w in failing[:5]:
        print(f"  not ok: {w.get('name')} {w.get('image')} outcome={w.get('outcome')} "
              f"error={w.get('last_error')}")
    if len(watches) != a.n_watches:
        problems.append(f"/v1/watches lists {len(watches)} watches, expected {a.n_watches}")
    if outcomes.get("ok", 0) != a.n_watches:
        problems.append(f"{a.n_watches - outcomes.get('ok', 0)} watches not ok")
    if len(digests) != a.n_tags:
        problems.append(f"{len(digests)} distinct digests, expected {a.n_tags}")

    # Final figures.
    steady_k = [k for k in range(1, cycles) if spread[k] is not None]
    steady_cpu = [cpu[k] for k in range(1, cycles) if cpu[k] is not None]
    if not steady_k or not steady_cpu:
        print("daemon: no steady cycle observed", file=sys.stderr)
        return 1
    counts = [spread[k][0] for k in steady_k]
    counts_s = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
    pooled = sorted(o for k in steady_k for o in spread[k][9])
    width = max(spread[k][2] - spread[k][1] for k in steady_k)
    burst = max(spread[k][5] for k in steady_k)
    cpu_s = statistics.median(steady_cpu)
    if any(abs(n - a.n_tags) > a.n_tags * 0.02 for n in counts):
        problems.append(f"HEAD requests per steady cycle {counts_s}, expected ~{a.n_tags}")
    if steady_rss_kb / 1024 > 30:
        problems.append(f"steady RSS {steady_rss_kb / 1024:.1f} MB is over the 30 MB target")
    if a.exit_status != 0:
        problems.append(f"exit status {a.exit_status} after SIGTERM")

    hwm_note = ""
    if a.hwm_before_watches and a.hwm_before_watches < peak_kb:
        hwm_note = f" ({a.hwm_before_watches / 1024:.1f} MB before GET /v1/watches)"
    print()
    print(f"=== driftwatch daemon bench ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}) ===")
    print(f"steady CPU per cycle: {', '.join(f'{c:.2f}' for c in steady_cpu)} s (median {cpu_s:.2f} s); "
          f"steady RSS = median VmRSS of {len(steady_rss)} samples over the last 2 minutes; "
          f"spread figures: p50/p90 of all steady cycles' offsets pooled, "
          f"spread and burst the worst steady cycle")
    print(f"daemon, {a.n_watches} watches / {a.n_tags} tags, {a.schedule_desc}: "
          f"peak RSS {peak_kb / 1024:.1f} MB{hwm_note}, steady RSS {steady_rss_kb / 1024:.1f} MB; "
          f"CPU per steady cycle {cpu_s:.2f} s (baseline cycle {cpu[0]:.2f} s); "
          f"requests per steady cycle {counts_s}; "
          f"request starts spread over {width:.1f} s of the 60 s interval "
          f"(p50 {percentile(pooled, 50):.1f} s, p90 {percentile(pooled, 90):.1f} s, "
          f"max {burst} requests in one second); "
          f"exit status {a.exit_status} after SIGTERM in {a.shutdown_s:.2f} s")
    for p in problems:
        print(f"WARNING: {p}")
    return 0


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "sample":
        if len(sys.argv) not in (4, 5):
            raise SystemExit("usage: daemon_stats.py sample PID OUT [MAX_SECONDS]")
        sample(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if len(sys.argv) == 5 else 1200)
        return 0
    if len(sys.argv) >= 2 and sys.argv[1] == "report":
        p = argparse.ArgumentParser(prog="daemon_stats.py report")
        p.add_argument("--samples", required=True)
        p.add_argument("--registry-log", required=True)
        p.add_argument("--access-log", required=True)
        p.add_argument("--watches", required=True)
        p.add_argument("--tick0", type=int, required=True)
        p.add_argument("--cycles", type=int, required=True)
        p.add_argument("--clk-tck", type=int, required=True)
        p.add_argument("--run-end", type=float, required=True)
        p.add_argument("--hwm-before-watches", type=int, default=0)
        p.add_argument("--exit-status", type=int, required=True)
        p.add_argument("--shutdown-s", type=float, required=True)
        p.add_argument("--n-watches", type=int, required=True)
        p.add_argument("--n-tags", type=int, required=True)
        p.add_argument("--schedule-desc", required=True)
        return report(p.parse_args(sys.argv[2:]))
    raise SystemExit("usage: daemon_stats.py sample PID OUT [MAX_SECONDS] | report ...")


if __name__ == "__main__":
    sys.exit(main())
