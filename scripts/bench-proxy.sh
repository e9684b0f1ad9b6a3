#!/usr/bin/env bash
# Relay benchmark: the same echo load sent directly to an echo server, through a wsbridge
# `[[proxies]]` route and through nginx, on this machine's loopback interface. Prints one Markdown
# table (docs/BENCHMARKS.md, "Proxy relay", explains it).
#
#   scripts/bench-proxy.sh
#
# For each path and each client count it runs every rate of the grid, then searches for the
# highest rate that still passes (no message lost, p99 at most MAX_P99_MS). With the defaults it
# takes 7 to 9 minutes (at most 36 runs) once the binaries are built. Release binaries are built
# into target/bench-release so the debug target stays free. Every process it starts listens on 127.0.0.1 only and is stopped
# when the script exits, however it exits.
#
# Settings (environment):
#   CLIENTS="100 1000"             client connections per run
#   RATES="10000 50000 100000"     total messages per second
#   DURATION=10s                   sending time of a grid run
#   SEARCH_DURATION=5s             sending time of a search run
#   SEARCH_STEPS=3                 search runs per path and client count
#   MAX_P99_MS=50                  a passing run's largest p99
#   PAYLOAD=128                    bytes per message
#   PATHS="direct wsbridge nginx"  which paths to measure
#   RESULTS=FILE                   also keep every run's JSON line in FILE
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C

CLIENTS=${CLIENTS:-"100 1000"}
RATES=${RATES:-"10000 50000 100000"}
DURATION=${DURATION:-10s}
SEARCH_DURATION=${SEARCH_DURATION:-5s}
SEARCH_STEPS=${SEARCH_STEPS:-3}
MAX_P99_MS=${MAX_P99_MS:-50}
PAYLOAD=${PAYLOAD:-128}
PATHS=${PATHS:-"direct wsbridge nginx"}
DRAIN=3s

export CARGO_TARGET_DIR="$PWD/target/bench-release"
echo "building release binaries in $CARGO_TARGET_DIR" >&2
nice -n 10 cargo build --release --quiet --bin wsbridge --bin wsbridge-relay-bench
bin="$CARGO_TARGET_DIR/release"

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-proxy.XXXXXX")
results="$work/results.jsonl"
: >"$results"
pids=()

stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    # SIGTERM: nginx's master then stops its workers too.
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "${RESULTS:-}" ] && [ -s "$results" ]; then
    cp "$results" "$RESULTS"
  fi
  rm -rf "$work"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# A port below the ephemeral range (so the clients' own ports never take it) that nothing
# answers on.
used_ports=" "
free_port() {
  local port
  for _ in $(seq 200); do
    port=$((20000 + RANDOM % 12000))
    case "$used_ports" in *" $port "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      used_ports="$used_ports$port "
      echo "$port"
      return 0
    fi
  done
  echo "no free port found" >&2
  return 1
}

# Waits until something accepts on the port, or fails after 10 s or when the process died.
wait_listening() {
  local name=$1 pid=$2 port=$3
  for _ in $(seq 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited before it listened on $port" >&2
      return 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "$name did not listen on $port within 10s" >&2
  return 1
}

declare -A url=() relay_pids=()

echo_port=$(free_port)
"$bin/wsbridge-relay-bench" echo-server --listen "127.0.0.1:$echo_port" 2>"$work/echo.log" &
pids+=($!)
wait_listening "echo server" "${pids[-1]}" "$echo_port"
url[direct]="ws://127.0.0.1:$echo_port/"

if [[ " $PATHS " == *" wsbridge "* ]]; then
  gateway_port=$(free_port)
  cat >"$work/wsbridge.toml" <<EOF
[server]
listen = "127.0.0.1:$gateway_port"

# Every client comes from 127.0.0.1 and connects at once.
[limits]
max_connections = 0
max_connections_per_ip = 0
new_connections_per_second_per_ip = 0

[backends.local]
type = "memory"

[[routes]]
channel = "#"
backend = "local"
topic = "#"
allow = ["subscribe", "publish"]

[[proxies]]
path = "/echo"
upstreams = ["ws://127.0.0.1:$echo_port/"]
EOF
  if "$bin/wsbridge" check-config "$work/wsbridge.toml" >"$work/check.log" 2>&1; then
    "$bin/wsbridge" run --config "$work/wsbridge.toml" >"$work/wsbridge.log" 2>&1 &
    pids+=($!)
    wait_listening wsbridge "${pids[-1]}" "$gateway_port"
    relay_pids[wsbridge]=${pids[-1]}
    url[wsbridge]="ws://127.0.0.1:$gateway_port/echo"
  else
    echo "skipping wsbridge: this build does not accept the [[proxies]] route:" >&2
    cat "$work/check.log" >&2
  fi
fi

if [[ " $PATHS " == *" nginx "* ]]; then
  nginx=$(command -v nginx || true)
  [ -n "$nginx" ] || { [ -x /usr/sbin/nginx ] && nginx=/usr/sbin/nginx; }
  if [ -n "$nginx" ]; then
    nginx_port=$(free_port)
    mkdir -p "$work/nginx"
    cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
# One worker per core, as wsbridge runs one runtime thread per core.
worker_processes auto;
worker_rlimit_nofile 20000;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/client_body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$nginx_port;
    location = /echo {
      proxy_pass http://127.0.0.1:$echo_port/;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header Host \$host;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
EOF
    "$nginx" -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>"$work/nginx/stderr.log" &
    pids+=($!)
    wait_listening nginx "${pids[-1]}" "$nginx_port"
    # The master and its workers (forked once it listens).
    workers=""
    for _ in $(seq 50); do
      workers=$(ps -o pid= --ppid "${pids[-1]}" | tr '\n' ' ' || true)
      if [ -n "${workers// /}" ]; then break; fi
      sleep 0.1
    done
    relay_pids[nginx]="${pids[-1]} $workers"
    url[nginx]="ws://127.0.0.1:$nginx_port/echo"
  else
    echo "skipping nginx: not installed (scripts/setup/70-nginx.sh installs it)" >&2
  fi
fi

paths=()
for path in direct wsbridge nginx; do
  if [[ " $PATHS " == *" $path "* ]] && [ -n "${url[$path]:-}" ]; then
    paths+=("$path")
  fi
done

# CPU time (user + system, in clock ticks) the processes have used so far.
cpu_ticks() {
  local pid total=0
  for pid in "$@"; do
    if [ -r "/proc/$pid/stat" ]; then
      # utime and stime are fields 14 and 15; the command name before them may contain spaces.
      total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
    fi
  done
  echo "$total"
}
ticks_per_s=$(getconf CLK_TCK)

# One run; appends its JSON line (with the path and the kind of run) to the results.
measure() {
  local path=$1 kind=$2 clients=$3 rate=$4 duration=$5 line before cpu
  echo "  $path: $clients clients, $rate msg/s for $duration" >&2
  # shellcheck disable=SC2086 # a list of PIDs
  before=$(cpu_ticks ${relay_pids[$path]:-})
  if line=$("$bin/wsbridge-relay-bench" run --url "${url[$path]}" -n "$clients" --rate "$rate" \
    --duration "$duration" --drain "$DRAIN" --payload-size "$PAYLOAD" --connect-timeout 10s \
    --json 2>"$work/run.err"); then
    # shellcheck disable=SC2086
    cpu=$(($(cpu_ticks ${relay_pids[$path]:-}) - before))
    jq -c --arg path "$path" --arg kind "$kind" --argjson max "$MAX_P99_MS" \
      --argjson cpu "$cpu" --argjson hz "$ticks_per_s" \
      '. + {path: $path, kind: $kind, relay_cpu_s: ($cpu / $hz), pass: (.lost == 0 and .sent == .scheduled
        and .failed_connections == 0 and .p99_ms <= $max)}' <<<"$line" >>"$results"
  else
    jq -nc --arg path "$path" --arg kind "$kind" --argjson clients "$clients" \
      --argjson rate "$rate" --arg error "$(tr -s '\n' ' ' <"$work/run.err" | cut -c 1-160)" \
      '{path: $path, kind: $kind, clients: $clients, rate: $rate, error: $error, pass: false}' \
      >>"$results"
  fi
  # Let the relays finish closing the previous run's connections.
  sleep 1
}

# Whether the last result passed.
last_passed() {
  [ "$(tail -n 1 "$results" | jq -r .pass)" = true ]
}

runs=$(( ${#paths[@]} * $(wc -w <<<"$CLIENTS") * ($(wc -w <<<"$RATES") + SEARCH_STEPS) ))
echo "measuring ${paths[*]}: at most $runs runs; load average $(cut -d ' ' -f 1-3 /proc/loadavg)" >&2
for clients in $CLIENTS; do
  for path in "${paths[@]}"; do
    pass=0 fail=0 failed=" "
    for rate in $RATES; do
      measure "$path" grid "$clients" "$rate" "$DURATION"
      if last_passed; then
        if [ "$rate" -gt "$pass" ]; then pass=$rate; fi
      else
        failed="$failed$rate "
      fi
    done
    # The search lies between the highest pass and the lowest failure above it.
    for rate in $failed; do
      if [ "$rate" -gt "$pass" ] && { [ "$fail" -eq 0 ] || [ "$rate" -lt "$fail" ]; }; then
        fail=$rate
      fi
    done
    # Double while everything passes, then halve the gap, in steps of 1,000 msg/s.
    for _ in $(seq "$SEARCH_STEPS"); do
      if [ "$fail" -eq 0 ]; then
        rate=$((pass * 2))
      else
        rate=$(((pass + fail) / 2 / 1000 * 1000))
      fi
      if [ "$rate" -le "$pass" ] || { [ "$fail" -ne 0 ] && [ "$rate" -ge "$fail" ]; }; then
        break
      fi
      measure "$path" search "$clients" "$rate" "$SEARCH_DURATION"
      if last_passed; then pass=$rate; else fail=$rate; fi
    done
    # The passing run at the highest rate, whichever kind it was.
    if [ "$pass" -gt 0 ]; then
      jq -c --arg path "$path" --argjson clients "$clients" --argjson rate "$pass" \
        'select(.path == $path and .clients == $clients and .rate == $rate and .pass)
          | . + {from: .kind, kind: "best"}' "$results" | tail -n 1 >>"$results"
    fi
  done
done

echo "done; load average $(cut -d ' ' -f 1-3 /proc/loadavg)" >&2

# The table: one row per client count, rate and path; "highest passing" rows last.
thousands() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$1"; }
cell() { jq -r "$1" <<<"$2"; }
echo
echo "| clients | offered msg/s | path | echoes/s | lost | p50 ms | p99 ms | added p50 / p99 ms | relay CPU µs/echo | passes |"
echo "|---:|---:|---|---:|---:|---:|---:|---:|---:|:---:|"
row() {
  local label=$1 r=$2 direct=$3 path echoes lost p50 p99 added cpu pass
  path=$(cell .path "$r")
  if [ "$(cell '.error // empty' "$r")" != "" ]; then
    echo "| $(cell .clients "$r") | $label | $path | failed: $(cell .error "$r") | | | | | | no |"
    return
  fi
  echoes=$(thousands "$(cell '.echoes_per_s | round' "$r")")
  lost=$(cell '.lost + (.scheduled - .sent)' "$r")
  p50=$(printf '%.2f' "$(cell .p50_ms "$r")")
  p99=$(printf '%.2f' "$(cell .p99_ms "$r")")
  added="—"
  if [ -n "$direct" ] && [ "$path" != direct ] && [ "$(cell '.error // empty' "$direct")" = "" ]; then
    added=$(printf '%+.2f / %+.2f' \
      "$(jq -rn --argjson a "$r" --argjson d "$direct" '$a.p50_ms - $d.p50_ms')" \
      "$(jq -rn --argjson a "$r" --argjson d "$direct" '$a.p99_ms - $d.p99_ms')")
  fi
  cpu="—"
  if [ "$path" != direct ]; then
    cpu=$(printf '%.1f' "$(cell '.relay_cpu_s * 1e6 / ([.echoed, 1] | max)' "$r")")
  fi
  pass=no
  if [ "$(cell .pass "$r")" = true ]; then pass=yes; fi
  echo "| $(cell .clients "$r") | $label | $path | $echoes | $lost | $p50 | $p99 | $added | $cpu | $pass |"
}
for clients in $CLIENTS; do
  for rate in $RATES; do
    direct=$(jq -c --argjson c "$clients" --argjson r "$rate" \
      'select(.kind == "grid" and .path == "direct" and .clients == $c and .rate == $r)' "$results")
    for path in "${paths[@]}"; do
      r=$(jq -c --arg p "$path" --argjson c "$clients" --argjson r "$rate" \
        'select(.kind == "grid" and .path == $p and .clients == $c and .rate == $r)' "$results")
      if [ -n "$r" ]; then row "$(thousands "$rate")" "$r" "$direct"; fi
    done
  done
done
for clients in $CLIENTS; do
  for path in "${paths[@]}"; do
    r=$(jq -c --arg p "$path" --argjson c "$clients" \
      'select(.kind == "best" and .path == $p and .clients == $c)' "$results")
    if [ -n "$r" ]; then
      from=""
      if [ "$(cell .from "$r")" = search ]; then from=" ($SEARCH_DURATION run)"; fi
      row "highest passing: $(thousands "$(cell .rate "$r")")$from" "$r" ""
    else
      echo "| $clients | highest passing: none | $path | | | | | | | no |"
    fi
  done
done
