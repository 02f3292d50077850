#!/usr/bin/env bash
# Instructions per request, Till against the hyper baseline, counted by
# callgrind: deterministic where req/s on a shared 2-core machine is not
# (the same binary measures within 1 % run to run).
#
#   bash benches/callgrind.sh [REQUESTS]      # default 2000
#   TILL_BIN=/path/to/older/till bash benches/callgrind.sh   # before/after
#   CALLGRIND_OPTS=--cache-sim=yes bash benches/callgrind.sh  # + cache misses
#
# Needs valgrind (apt-get install valgrind) and python3. Starts, on
# 127.0.0.1 ephemeral ports: the load benchmark's upstream, its
# hyper-baseline proxy under callgrind, and `till serve` under callgrind
# (durable counters, default policy, audit log on: the load benchmark's
# configuration), with the load benchmark's 3-block token. One keep-alive
# connection sends 300 warm-up requests, then the counters are zeroed,
# then REQUESTS identical POSTs are counted. Prints each proxy's
# instructions and heap allocations per request and, for Till, what each
# part of the request path costs (inclusive). The profiles stay in the
# printed directory for
# `callgrind_annotate --inclusive=yes --tree=calling FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
command -v valgrind >/dev/null || {
    echo "callgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2
    exit 2
}

if [ -z "${TILL_BIN:-}" ]; then
    cargo build --release --locked --bin till >&2
fi
TILL=${TILL_BIN:-target/release/till}
LOAD=$(cargo bench --locked --bench load --no-run 2>&1 | grep -o 'target/release/deps/load-[0-9a-f]*' | head -1)
OUT=$(mktemp -d /tmp/till-callgrind.XXXXXX)
H=$OUT/home
mkdir -p "$H"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -P $$ -x sleep 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT

# The role processes stop at end of input: keep it open.
wait_for() { # file pattern
    for _ in $(seq 1 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "callgrind.sh: no '$2' in $1" >&2
    cat "$1" >&2
    exit 1
}
sleep infinity | "$LOAD" --role upstream >"$OUT/upstream.out" 2>&1 &
PIDS+=($!)
wait_for "$OUT/upstream.out" 'listening on'
UP=$(grep -o 'listening on [0-9.:]*' "$OUT/upstream.out" | cut -d' ' -f3)

# shellcheck disable=SC2086 # options are words
sleep infinity | valgrind --tool=callgrind ${CALLGRIND_OPTS:-} --callgrind-out-file="$OUT/hyper.%p" \
    "$LOAD" --role hyper-baseline --upstream "http://$UP" --connections 4 \
    >"$OUT/hyper.out" 2>"$OUT/hyper.err" &
HYPER=$!
PIDS+=($HYPER)

export TILL_HOME=$H
"$TILL" keygen >/dev/null 2>&1
ROOT=$("$TILL" issue --service openai --method POST --path /v1/ --max-uses 1000000000 --ttl 24h --label bench-operator)
CHILD=$(echo "$ROOT" | "$TILL" attenuate --path /v1/chat/ --max-uses 100000000 --label bench-agent)
TOKEN=$(echo "$CHILD" | "$TILL" attenuate --model gpt-4o-mini --max-uses 10000000 --ttl 12h)
cat >"$H/till.toml" <<EOF
listen = "127.0.0.1:0"
state_dir = "$H"

[upstreams.openai]
url = "http://$UP"
credential = { env = "BENCH_UPSTREAM_KEY" }

[audit]
enabled = true
EOF
# shellcheck disable=SC2086
BENCH_UPSTREAM_KEY=sk-bench TILL_LOG=warn valgrind --tool=callgrind ${CALLGRIND_OPTS:-} \
    --callgrind-out-file="$OUT/till.%p" "$TILL" serve --config "$H/till.toml" \
    >"$OUT/till.out" 2>"$OUT/till.err" &
TILLPID=$!
PIDS+=($TILLPID)

wait_for "$OUT/hyper.out" 'listening on'
wait_for "$OUT/till.out" 'listening on'
HADDR=$(grep -o 'listening on [0-9.:]*' "$OUT/hyper.out" | cut -d' ' -f3)
TADDR=$(grep -o 'listening on http://[0-9.:]*' "$OUT/till.out" | sed 's|.*http://||')

measure() { # addr pid
    python3 - "$1" "$TOKEN" "$2" "$N" <<'EOF'
import http.client, subprocess, sys
addr, token, pid, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
host, port = addr.rsplit(":", 1)
body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}'
c = http.client.HTTPConnection(host, int(port), timeout=120)
def send(k):
    for _ in range(k):
        c.request("POST", "/openai/v1/chat/completions", body=body,
                  headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            sys.exit(f"callgrind.sh: {addr} answered {r.status}: {data[:200]!r}")
def control(*args):
    subprocess.run(["callgrind_control", *args, pid], check=True, stdout=subprocess.DEVNULL)
send(300)
control("-z")
send(n)
control("-d", "measured")
# Callgrind takes commands only while the process runs code: wake it.
send(3)
EOF
}
measure "$HADDR" "$HYPER"
measure "$TADDR" "$TILLPID"
sleep 1

total() { # profile
    grep -h '^summary:' "$1" | awk -v n="$N" '{ printf "%.1f", $2 / n / 1000 }'
}
HFILE=$OUT/hyper.$HYPER.1
TFILE=$OUT/till.$TILLPID.1
printf '\ninstructions per request (thousands), %s warm keep-alive POSTs, 3-block token\n' "$N"
printf '  hyper-baseline  %s\n' "$(total "$HFILE")"
printf '  till            %s\n' "$(total "$TFILE")"

# Calls into Rust's allocator (alloc, alloc_zeroed, realloc) from anywhere.
allocs() { # profile
    python3 - "$1" "$N" <<'EOF'
import re, sys
names, cur, n = {}, None, 0
def name(tok):
    m = re.match(r'\((\d+)\)(?: (.*))?', tok)
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), '')
for line in open(sys.argv[1], errors='replace'):
    # A function's name is given once, where it first appears.
    if line.startswith('fn='):
        name(line[3:].strip())
    elif line.startswith('cfn='):
        cur = name(line[4:].strip())
    elif line.startswith('calls=') and cur is not None:
        if cur.endswith(('__rust_alloc', '__rust_alloc_zeroed', '__rust_realloc')):
            n += int(line.split()[0][6:])
        cur = None
print(f"{n / int(sys.argv[2]):.1f}")
EOF
}
printf '\nheap allocations per request\n'
printf '  hyper-baseline  %s\n' "$(allocs "$HFILE")"
printf '  till            %s\n' "$(allocs "$TFILE")"

printf '\ntill, inclusive, per request (thousands):\n'
callgrind_annotate --inclusive=yes --threshold=100 "$TFILE" 2>/dev/null >"$OUT/till.inclusive.txt"
part() { # label "function[ | other name]" [profile text]
    # A function appears once per source file inlined into it; the first
    # line (largest) is its whole inclusive cost.
    awk -v fn="$2" -v n="$N" -v l="$1" '
        { f = $0; sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", f); sub(/ \[.*$/, "", f)
          f = substr(f, index(f, ":") + 1)
          n_alt = split(fn, alt, " [|] ")
          for (a = 1; a <= n_alt; a++) if (f == alt[a]) hit = 1
          if (hit) { ir = $1; gsub(",", "", ir); printf "  %-44s %6.1f\n", l, ir / n / 1000; found = 1; exit } }
        END { if (!found) printf "  %-44s %6s\n", l, "-" }' "${3:-$OUT/till.inclusive.txt}"
}
# The handler's outer future (token, counts, path, record) is inlined into
# a `Map::poll` that no name tells from others; its inner future is named.
part "handler, inner future:" 'till::proxy::handler::handle::{{closure}}::{{closure}} | till::proxy::handler::proxy_from::{{closure}} | till::proxy::handler::proxy::{{closure}}'
part "  body read" 'till::proxy::handler::read_body::{{closure}}'
part "  model from the body" 'till_core::request::model_of_json_request | till_core::request::model_of'
part "  decide (cached; head and body)" 'till::proxy::handler::Counts::decide::{{closure}}'
part "  reserve + re-check" 'till::proxy::handler::reserve_and_recheck::{{closure}}'
part "  forward (request out, response head in)" 'till::proxy::forward::forward::{{closure}}'
part "    hyper client send_request" 'hyper_util::client::legacy::client::Client<C,B>::send_request::{{closure}}'
printf '  %s\n' "handler, outer future (no total of its own):"
part "  token from headers" 'till_core::request::token_from_headers | till::proxy::handler::extract_token'
part "  verify (token cache)" 'till::proxy::handler::verify_token'
part "  path normalisation" 'till_core::path::normalize'
part "  counts before deciding" 'till::proxy::handler::Counts::current::{{closure}}'
part "  record (metrics, audit, alerts)" 'till::monitor::Monitor::record'
part "    audit line" 'till::monitor::audit::AuditSink::log'
part "hyper server: request head parse" 'hyper::proto::h1::conn::Conn<I,B,T>::poll_read_head'

printf '\nhyper-baseline, inclusive, per request (thousands):\n'
callgrind_annotate --inclusive=yes --threshold=100 "$HFILE" 2>/dev/null >"$OUT/hyper.inclusive.txt"
part "hyper client send_request" 'hyper_util::client::legacy::client::Client<C,B>::send_request::{{closure}}' "$OUT/hyper.inclusive.txt"
part "hyper server: request head parse" 'hyper::proto::h1::conn::Conn<I,B,T>::poll_read_head' "$OUT/hyper.inclusive.txt"
events() { # profile
    awk '/^events:/ { for (i = 2; i <= NF; i++) name[i] = $i }
         /^summary:/ { for (i = 2; i <= NF; i++) printf "%s%s %.1f", (i > 2 ? ", " : ""), name[i], $i / n; print "" }' n="$N" "$1"
}
if [ -n "${CALLGRIND_OPTS:-}" ]; then
    printf '\nevents per request:\n  hyper-baseline  %s\n  till            %s\n' "$(events "$HFILE")" "$(events "$TFILE")"
fi
printf '\nprofiles: %s\n' "$OUT"
