#!/usr/bin/env bash
# Side-by-side performance of submitd and (optionally) a peer MSA, with examples/loadgen.rs.
# Run with --help for the options; README.md "Performance" explains the setup.
set -Eeuo pipefail

usage() {
    cat <<'EOF'
Usage: bench/compare.sh [options]

Measures submitd with examples/loadgen.rs (real SMTP clients: TCP, TLS, AUTH PLAIN,
MAIL/RCPT/DATA) and, with --peer, a second MSA (the Postfix peer from
../shared/bench/peer-postfix) in the same session, interleaved: each scenario runs against
submitd, then against the peer, before the next scenario starts. Prints every loadgen JSON
line as it comes, then a table with msgs/s, p99 end-of-DATA -> 250 and the ratios
submitd/peer (absolute numbers drift between machines and runs; compare ratios).

Scenarios (--scenarios, default "idle a b c"; message totals scale with --scale;
idle runs once whatever --repeat says):
  idle  N authenticated TLS sessions held open (--idle, default 200): server RSS
        (VmRSS of the process and its children) before and after, per session.
        Runs first by default, before load has left Postfix smtpd processes
        lingering; submitd gets a warm-up of N logins first, at most 20 open at a time
        (allocator memory kept after the first argon2 verifications is a one-off,
        not a per-session cost: rss_fresh_kib -> rss_before_kib shows it).
  a     a new TCP+TLS+AUTH per message, 20 clients, 4 KiB          (400 messages)
  b     100 messages per connection, 20 clients, 4 KiB             (4000 messages)
  c     10 messages per connection, 50 clients, 100 KiB            (1000 messages)

The submitd under test, one of:
  --start                 build (release) and start a submitd for the run: temp dir, SQLite,
                          self-signed certificate, RSA-2048 DKIM key for example.com (as the
                          peer's OpenDKIM), relaying to loadgen's counting sink (--sink), so
                          its figures are submitted-and-delivered; stopped at the end.
                          This is the default when --target is not given.
  --target HOST:PORT      an already running submitd (then give --user/--password/--from and
                          --pid/--pidfile for the idle RSS; its smart host should be --sink).

Options for submitd:
  --mode starttls|implicit  587-style STARTTLS or 465-style TLS (default starttls; applies
                          to the peer too: give its 465-style port with --peer)
  --user U --password P --from F   credentials (default with --start:
                          sender@example.com / loadpass / sender@example.com)
  --to ADDR               recipient (default rcpt@example.net)
  --ca FILE | --insecure  certificate check for --target (default --insecure);
  --server-name NAME      with --start the generated certificate is checked with --ca
  --pid PID | --pidfile FILE   the submitd process, for the idle RSS (known with --start)
  --sink HOST:PORT        where loadgen runs its counting sink for submitd runs
                          (default 127.0.0.1:12525; "none": no sink, no delivered figure)
  --port-base N           with --start: listen on 127.0.0.1:N+587 and N+465 (default 12000)
  --dkim rsa|ed25519|none with --start: DKIM key type (default rsa, 2048 bits)
  --auth-cache off|on     with --start: submitd's cache of verified passwords ([auth]
                          cache_ttl). Default off, like the peer's Dovecot (auth_cache_size
                          = 0), so every AUTH pays argon2id on both sides; "on" measures
                          submitd's defaults (repeated logins skip argon2id)
  --keep                  with --start: keep the temp dir (config, logs, spool)
  --serve                 with --start: run no scenario; print a loadgen command for this
                          submitd and keep it running until Ctrl-C (for manual runs)
  --no-build              use the binaries already in target/release

The peer (all optional):
  --peer HOST:PORT        second target, e.g. 127.0.0.1:10587 (Postfix peer, STARTTLS) or
                          127.0.0.1:10465 with --mode implicit; its certificate is not checked
  --peer-user U --peer-password P --peer-from F   (default loaduser / loadpass /
                          sender@example.com, as peer-postfix/setup.sh creates them)
  --peer-pid PID | --peer-pidfile FILE   the peer's master process; RSS is summed over it
                          and its children (one smtpd per session). Default pidfile:
                          /tmp/pf-peer/queue/pid/master.pid when readable.
  --peer-conf DIR         Postfix config dir of the peer (default /tmp/pf-peer/conf when
                          present): after each peer run, wait until `postqueue -p` says the
                          queue is empty, so the next run starts on an idle machine and the
                          peer's delivered/s is ok / (time until its queue was empty)
  --peer-sink HOST:PORT   count the peer's relayed mail with loadgen's sink instead (only if
                          the peer's smart host points there: stop its smtp-sink first)

Run control:
  --scenarios "LIST"      subset/order of: idle a b c (default "idle a b c")
  --repeat N              run each scenario N times (interleaved), report medians (default 1)
  --scale F               multiply message totals (e.g. 0.25 for a quick run; default 1)
  --idle N                idle sessions (default 200)      --hold SECS  hold them (default 5)
  --out FILE              also append every labelled JSON line to FILE
  -h, --help              this text

Examples:
  bench/compare.sh --start                                     # submitd alone
  sudo ../shared/bench/peer-postfix/setup.sh                   # once: start the Postfix peer
  bench/compare.sh --start --peer 127.0.0.1:10587 --repeat 3   # both, medians of 3
  bench/compare.sh --start --scenarios b --scale 0.5           # one quick scenario
EOF
}

die() { echo "compare.sh: $*" >&2; exit 1; }
log() { echo "compare.sh: $*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

START=""
TARGET=""
MODE=starttls
USER_NAME=""
PASSWORD=""
FROM=""
TO=rcpt@example.net
CA=""
INSECURE=""
SERVER_NAME=""
PID=""
PIDFILE=""
SINK=127.0.0.1:12525
PORT_BASE=12000
DKIM=rsa
AUTH_CACHE=off
KEEP=""
SERVE=""
BUILD=1
PEER=""
PEER_USER=loaduser
PEER_PASSWORD=loadpass
PEER_FROM=sender@example.com
PEER_PID=""
PEER_PIDFILE=""
PEER_CONF=""
PEER_SINK=""
SCENARIOS="idle a b c"
REPEAT=1
SCALE=1
IDLE=200
HOLD=5
OUT=""

need_arg() { [ $# -ge 2 ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --start) START=1; shift; continue ;;
        --insecure) INSECURE=1; shift; continue ;;
        --keep) KEEP=1; shift; continue ;;
        --serve) SERVE=1; shift; continue ;;
        --no-build) BUILD=""; shift; continue ;;
    esac
    case "$1" in
        --target|--mode|--user|--password|--from|--to|--ca|--server-name|--pid|--pidfile|\
        --sink|--port-base|--dkim|--auth-cache|--peer|--peer-user|--peer-password|--peer-from|\
        --peer-pid|--peer-pidfile|--peer-conf|--peer-sink|--scenarios|--repeat|--scale|--idle|\
        --hold|--out) need_arg "$@" ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    case "$1" in
        --target) TARGET=$2 ;;
        --mode) MODE=$2 ;;
        --user) USER_NAME=$2 ;;
        --password) PASSWORD=$2 ;;
        --from) FROM=$2 ;;
        --to) TO=$2 ;;
        --ca) CA=$2 ;;
        --server-name) SERVER_NAME=$2 ;;
        --pid) PID=$2 ;;
        --pidfile) PIDFILE=$2 ;;
        --sink) SINK=$2 ;;
        --port-base) PORT_BASE=$2 ;;
        --dkim) DKIM=$2 ;;
        --auth-cache) AUTH_CACHE=$2 ;;
        --peer) PEER=$2 ;;
        --peer-user) PEER_USER=$2 ;;
        --peer-password) PEER_PASSWORD=$2 ;;
        --peer-from) PEER_FROM=$2 ;;
        --peer-pid) PEER_PID=$2 ;;
        --peer-pidfile) PEER_PIDFILE=$2 ;;
        --peer-conf) PEER_CONF=$2 ;;
        --peer-sink) PEER_SINK=$2 ;;
        --scenarios) SCENARIOS=$2 ;;
        --repeat) REPEAT=$2 ;;
        --scale) SCALE=$2 ;;
        --idle) IDLE=$2 ;;
        --hold) HOLD=$2 ;;
        --out) OUT=$2 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done

[ -n "$TARGET" ] || START=1
[ -z "$START" ] || [ -z "$TARGET" ] || die "--start and --target exclude each other"
[ -z "$SERVE" ] || [ -n "$START" ] || die "--serve needs --start"
case "$MODE" in starttls|implicit) ;; *) die "--mode must be starttls or implicit" ;; esac
case "$DKIM" in rsa|ed25519|none) ;; *) die "--dkim must be rsa, ed25519 or none" ;; esac
case "$AUTH_CACHE" in on|off) ;; *) die "--auth-cache must be on or off" ;; esac
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive integer"
[[ "$IDLE" =~ ^[1-9][0-9]*$ ]] || die "--idle must be a positive integer"
[[ "$HOLD" =~ ^[0-9]+$ ]] || die "--hold must be a number of seconds"
[[ "$SCALE" =~ ^[0-9]*\.?[0-9]+$ ]] || die "--scale must be a positive number"
for s in $SCENARIOS; do
    case "$s" in idle|a|b|c) ;; *) die "unknown scenario $s (idle a b c)" ;; esac
done

if [ -n "$PEER" ]; then
    if [ -z "$PEER_PID" ] && [ -z "$PEER_PIDFILE" ] && [ -r /tmp/pf-peer/queue/pid/master.pid ]; then
        PEER_PIDFILE=/tmp/pf-peer/queue/pid/master.pid
    fi
    if [ -z "$PEER_CONF" ] && [ -z "$PEER_SINK" ] && [ -d /tmp/pf-peer/conf ]; then
        PEER_CONF=/tmp/pf-peer/conf
    fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/submitd-bench.XXXXXX")
SERVER_PID=""
cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping submitd (pid $SERVER_PID)"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "$KEEP" ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "failed: line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT TERM

port_open() { # host:port
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}
wait_port() {
    for _ in $(seq 300); do
        port_open "$1" && return 0
        [ -z "$SERVER_PID" ] || kill -0 "$SERVER_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------------------------ build
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -n "$BUILD" ]; then
    log "building (release): submitd and examples/loadgen"
    cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" --bin submitd --example loadgen
fi
SUBMITD=$TARGET_DIR/release/submitd
LOADGEN=$TARGET_DIR/release/examples/loadgen
[ -x "$LOADGEN" ] || die "$LOADGEN missing (run without --no-build)"

# ------------------------------------------------------------------ start submitd
if [ -n "$START" ]; then
    [ -x "$SUBMITD" ] || die "$SUBMITD missing (run without --no-build)"
    SUB_ADDR=127.0.0.1:$((PORT_BASE + 587))
    SUBS_ADDR=127.0.0.1:$((PORT_BASE + 465))
    for a in "$SUB_ADDR" "$SUBS_ADDR"; do
        ! port_open "$a" || die "$a is in use (choose another --port-base)"
    done
    [ "$SINK" != none ] || die "--start needs a --sink address for the smart host"
    ! port_open "$SINK" || die "sink address $SINK is in use (choose another --sink)"
    USER_NAME=${USER_NAME:-sender@example.com}
    PASSWORD=${PASSWORD:-loadpass}
    FROM=${FROM:-$USER_NAME}
    if [ "$MODE" = starttls ]; then TARGET=$SUB_ADDR; else TARGET=$SUBS_ADDR; fi
    D=$WORK/submitd
    mkdir -p "$D/data" "$D/dkim"
    CONFIG=$D/submitd.toml
    dkim_conf=""
    if [ "$DKIM" != none ]; then
        "$SUBMITD" --config "$CONFIG" dkim generate --domain example.com --selector bench \
            --algorithm "$DKIM" --out "$D/dkim/example.com.bench.pem" >"$D/dkim/generate.out" 2>&1 \
            || { cat "$D/dkim/generate.out" >&2; die "dkim generate failed"; }
        dkim_conf=$(printf '[[dkim]]\ndomain = "example.com"\nselector = "bench"\nkey = "%s"\n' \
            "$D/dkim/example.com.bench.pem")
    fi
    cat >"$CONFIG" <<EOF
# written by bench/compare.sh
hostname = "localhost"
node = "bench"

[listen]
submission = ["$SUB_ADDR"]
submissions = ["$SUBS_ADDR"]

[tls]
cert = "$D/certs/fullchain.pem"
key = "$D/certs/privkey.pem"

[database]
url = "sqlite://$D/data/submitd.db"

[queue]
dir = "$D/data/queue"
first_retry = "1s"
max_retry = "5s"
max_age = "1h"
workers = 4

[relay]
host = "${SINK%:*}"
port = ${SINK##*:}
tls = "none"
timeout = "30s"
# loadgen's sink lives only as long as one run: do not reuse a connection across runs
idle_timeout = "1s"

[privacy]
received = "hide-ip"

[limits]
# every bench client comes from 127.0.0.1
max_connections = 5000
max_connections_per_ip = 5000
max_unauthenticated_per_ip = 1000

[timeouts]
shutdown_grace = "5s"

[auth]
$([ "$AUTH_CACHE" = on ] && echo '# cache_ttl: the default' || echo 'cache_ttl = "0s"   # like the peer: every AUTH pays argon2id')

$dkim_conf
EOF
    "$SUBMITD" --config "$CONFIG" cert self-signed --hostname localhost --out-dir "$D/certs" >/dev/null
    printf '%s\n' "$PASSWORD" | "$SUBMITD" --config "$CONFIG" user add "$USER_NAME" --password-stdin >/dev/null
    if [ "$FROM" != "$USER_NAME" ]; then
        "$SUBMITD" --config "$CONFIG" user allow "$USER_NAME" "$FROM" >/dev/null
    fi
    "$SUBMITD" --config "$CONFIG" check-config >"$D/check-config.out" 2>&1 \
        || { cat "$D/check-config.out" >&2; die "check-config failed"; }
    RUST_LOG=${RUST_LOG:-info} "$SUBMITD" --config "$CONFIG" serve >"$D/serve.log" 2>&1 &
    SERVER_PID=$!
    wait_port "$TARGET" || { tail -20 "$D/serve.log" >&2; die "submitd did not open $TARGET"; }
    PID=$SERVER_PID
    CA=$D/certs/fullchain.pem
    SERVER_NAME=localhost
    INSECURE=""
    log "submitd pid $SERVER_PID on $SUB_ADDR (STARTTLS) and $SUBS_ADDR (TLS), relaying to $SINK, auth cache $AUTH_CACHE; log $D/serve.log"
else
    [ -n "$USER_NAME" ] && [ -n "$PASSWORD" ] || die "--target needs --user and --password"
    FROM=${FROM:-$USER_NAME}
    [ -n "$CA" ] || INSECURE=1
fi
if [ -z "$PID" ] && [ -n "$PIDFILE" ]; then
    PID=$(tr -dc '0-9' <"$PIDFILE") || die "cannot read $PIDFILE"
fi
if [ -z "$PEER_PID" ] && [ -n "$PEER_PIDFILE" ]; then
    PEER_PID=$(tr -dc '0-9' <"$PEER_PIDFILE") || die "cannot read $PEER_PIDFILE"
fi

SUB_SINK=()
PEER_SINK_ARGS=()
SUB_ARGS=(--target "$TARGET" --mode "$MODE" --user "$USER_NAME" --password "$PASSWORD"
          --from "$FROM" --to "$TO")
if [ -n "$INSECURE" ]; then SUB_ARGS+=(--insecure); else SUB_ARGS+=(--ca "$CA"); fi
[ -z "$SERVER_NAME" ] || SUB_ARGS+=(--server-name "$SERVER_NAME")
[ "$SINK" = none ] || SUB_SINK=(--sink "$SINK")
if [ -n "$SERVE" ]; then
    echo "submitd is running (pid $SERVER_PID, files in $WORK); try, in another terminal:"
    echo "  $LOADGEN ${SUB_ARGS[*]} ${SUB_SINK[*]} --concurrency 20 --messages 200 --per-connection 10"
    echo "Ctrl-C stops it."
    while kill -0 "$SERVER_PID" 2>/dev/null; do sleep 1; done
    die "submitd exited; see $WORK/submitd/serve.log"
fi
PEER_ARGS=(--target "$PEER" --mode "$MODE" --insecure --user "$PEER_USER"
           --password "$PEER_PASSWORD" --from "$PEER_FROM" --to "$TO")
[ -z "$PEER_SINK" ] || PEER_SINK_ARGS=(--sink "$PEER_SINK")

# ------------------------------------------------------------------ helpers
# scenario name -> loadgen arguments
scenario_args() {
    local total
    case "$1" in
        a) total=400;  echo "--per-connection 1 --concurrency 20 --size 4096 --messages $(scaled $total 20)" ;;
        b) total=4000; echo "--per-connection 100 --concurrency 20 --size 4096 --messages $(scaled $total 20)" ;;
        c) total=1000; echo "--per-connection 10 --concurrency 50 --size 102400 --messages $(scaled $total 50)" ;;
    esac
}
scenario_title() {
    case "$1" in
        idle) echo "idle: $IDLE sessions, KiB/session" ;;
        a) echo "a: new TLS+AUTH per msg, 20 clients" ;;
        b) echo "b: 100 msgs/conn, 20 clients" ;;
        c) echo "c: 10 msgs/conn, 50 clients, 100 KiB" ;;
    esac
}
scaled() { # total minimum
    awk -v t="$1" -v s="$SCALE" -v m="$2" 'BEGIN { n = int(t * s + 0.5); if (n < m) n = m; print n }'
}
# field NAME JSON: a top-level number; field data_to_250_ms.p99 JSON: a nested one
field() {
    local json=$2
    case "$1" in
        *.*) sed -n "s/.*\"${1%%.*}\":{[^}]*\"${1#*.}\":\([^,}]*\).*/\1/p" <<<"$json" ;;
        *) sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$json" ;;
    esac
}
median() { # values (null / n/a skipped)
    printf '%s\n' "$@" | { grep -E '^[0-9.eE+-]+$' || true; } | sort -g \
        | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a";
               else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { # a b -> a/b with 2 decimals
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b + 0 == 0) print "n/a";
                                     else if (a / b >= 0.1) printf "%.2f\n", a / b;
                                     else printf "%.2g\n", a / b }'
}
rss_kib() { # VmRSS of PID plus all its descendants, in KiB
    local total=0 p v
    for p in $1 $(descendants "$1"); do
        v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
descendants() {
    local k
    for k in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
        echo "$k"
        descendants "$k"
    done
}
now() { date +%s.%N; }
peer_queue_empty() {
    postqueue -c "$PEER_CONF" -p 2>/dev/null | grep -q 'Mail queue is empty'
}
wait_peer_queue() { # seconds until the peer's queue is empty (max 300 s), n/a if unknown
    [ -n "$PEER_CONF" ] && command -v postqueue >/dev/null || { echo n/a; return; }
    for _ in $(seq 3000); do
        peer_queue_empty && { now; return; }
        sleep 0.1
    done
    log "the peer's queue did not empty within 300 s"
    echo n/a
}

declare -A MSGS P99 DLV RSS RSS_FRESH
record() { # scenario who json
    MSGS[$1,$2]+="$(field msgs_per_s "$3") "
    P99[$1,$2]+="$(field data_to_250_ms.p99 "$3") "
    DLV[$1,$2]+="$(field delivered_per_s "$3") "
}
emit() { # label json
    echo "[$1] $2"
    [ -z "$OUT" ] || echo "[$1] $2" >>"$OUT"
}

# run_load scenario who run
run_load() {
    local sc=$1 who=$2 n=$3 err=$WORK/loadgen.err line t0 t1 ok args
    read -r -a args <<<"$(scenario_args "$sc")"
    if [ "$who" = submitd ]; then
        args+=("${SUB_ARGS[@]}" "${SUB_SINK[@]}")
    else
        args+=("${PEER_ARGS[@]}" "${PEER_SINK_ARGS[@]}")
    fi
    t0=$(now)
    if ! line=$("$LOADGEN" "${args[@]}" 2>"$err"); then
        cat "$err" >&2
        die "loadgen failed ($sc, $who)"
    fi
    sed 's/^/    /' "$err" >&2
    if [ "$who" = peer ] && [ -z "$PEER_SINK" ]; then
        t1=$(wait_peer_queue)
        ok=$(field ok "$line")
        if [ "$t1" != n/a ]; then
            line=$(sed "s/\"delivered_per_s\":null/\"delivered_per_s\":$(awk -v o="$ok" -v a="$t0" -v b="$t1" \
                'BEGIN { printf "%.3f", o / (b - a) }')/" <<<"$line")
        fi
    fi
    [ "$(field failed "$line")" = 0 ] || log "$sc/$who: $(field failed "$line") messages failed"
    emit "$sc $who #$n" "$line"
    record "$sc" "$who" "$line"
}

# run_idle who run
run_idle() {
    local who=$1 n=$2 pid out=$WORK/idle.out err=$WORK/idle.err lp fresh=n/a before after est line
    local args=(--idle "$IDLE" --concurrency 20)
    if [ "$who" = submitd ]; then pid=$PID; args+=("${SUB_ARGS[@]}"); else pid=$PEER_PID; args+=("${PEER_ARGS[@]}"); fi
    if [ -n "$pid" ] && [ ! -r "/proc/$pid/status" ]; then
        log "idle/$who: no process $pid"; pid=""
    fi
    if [ "$who" = submitd ] && [ -n "$pid" ]; then
        # One process: memory the allocator keeps after the first logins (argon2 buffers
        # in malloc arenas) is a one-off, not a per-session cost. Warm up with as many
        # logins, at most 20 sessions open at a time (so freed session memory cannot
        # hide the cost of the N held ones), then measure. Not for the peer: its smtpd
        # processes would linger and be reused, hiding their cost.
        fresh=$(rss_kib "$pid")
        for _ in $(seq $(((IDLE + 19) / 20))); do
            "$LOADGEN" --idle 20 --hold 0 --concurrency 20 "${SUB_ARGS[@]}" >/dev/null 2>"$WORK/warmup.err" \
                || { cat "$WORK/warmup.err" >&2; die "loadgen failed (idle warm-up)"; }
        done
        sleep 1
    fi
    before=$([ -n "$pid" ] && rss_kib "$pid" || echo n/a)
    : >"$err"
    "$LOADGEN" "${args[@]}" --hold "$HOLD" >"$out" 2>"$err" &
    lp=$!
    for _ in $(seq 1200); do
        grep -q 'sessions established' "$err" && break
        kill -0 "$lp" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1
    after=$([ -n "$pid" ] && rss_kib "$pid" || echo n/a)
    wait "$lp" || { cat "$err" >&2; die "loadgen failed (idle, $who)"; }
    sed 's/^/    /' "$err" >&2
    line=$(cat "$out")
    est=$(sed -n 's/.*idle: \([0-9]*\)\/.*/\1/p' "$err")
    if [ "$before" != n/a ] && [ "${est:-0}" -gt 0 ]; then
        RSS[$who]+="$(awk -v a="$after" -v b="$before" -v n="$est" 'BEGIN { printf "%.1f", (a - b) / n }') "
        RSS_FRESH[$who]+="$(awk -v a="$after" -v b="$before" -v f="$fresh" -v n="$est" \
            'BEGIN { if (f == "n/a") f = b; printf "%.1f", (a - f) / n }') "
        [ "$fresh" != n/a ] || fresh=null
        line=${line%\}}",\"rss_fresh_kib\":$fresh,\"rss_before_kib\":$before,\"rss_after_kib\":$after}"
    fi
    emit "idle $who #$n" "$line"
}

# ------------------------------------------------------------------ run
WHO=(submitd)
[ -z "$PEER" ] || WHO+=(peer)
log "submitd: $TARGET ($MODE)${PEER:+, peer: $PEER}; scenarios: $SCENARIOS; repeat $REPEAT"
for sc in $SCENARIOS; do
    for n in $(seq "$REPEAT"); do
        if [ "$sc" = idle ] && [ "$n" -gt 1 ]; then
            # A second run measures memory both servers kept from the first (Postfix's
            # smtpd processes linger, the allocator keeps freed pages): only run 1 counts.
            log "scenario idle runs once (later runs would find the first one's memory)"
            break
        fi
        for who in "${WHO[@]}"; do
            log "scenario $sc, $who, run $n"
            if [ "$sc" = idle ]; then run_idle "$who" "$n"; else run_load "$sc" "$who" "$n"; fi
            # let the smart-host connections of the previous run expire (idle_timeout)
            sleep 1.5
        done
    done
done

# ------------------------------------------------------------------ table
echo
if [ "$REPEAT" -gt 1 ]; then echo "medians of $REPEAT runs (idle: one run)"; fi
if [ -n "$PEER" ]; then
    printf '%-40s | %9s %9s %9s | %9s %9s %9s | %8s %8s\n' "" "submitd" "" "" "peer" "" "" "ratio" "submitd/peer"
    printf '%-40s | %9s %9s %9s | %9s %9s %9s | %8s %8s\n' scenario "msgs/s" "p99 ms" "dlvd/s" "msgs/s" "p99 ms" "dlvd/s" "msgs/s" "p99"
else
    printf '%-40s | %9s %9s %9s\n' scenario "msgs/s" "p99 ms" "dlvd/s"
fi
for sc in $SCENARIOS; do
    if [ "$sc" = idle ]; then
        for kind in fresh warm; do
            if [ $kind = fresh ]; then
                title="idle: $IDLE sessions, KiB/session"
                # shellcheck disable=SC2086
                { s=$(median ${RSS_FRESH[submitd]:-}); p=$(median ${RSS_FRESH[peer]:-}); }
            else
                title="  the same after submitd's warm-up"
                # shellcheck disable=SC2086
                { s=$(median ${RSS[submitd]:-}); p=$(median ${RSS[peer]:-}); }
            fi
            if [ -n "$PEER" ]; then
                printf '%-40s | %9s %9s %9s | %9s %9s %9s | %8s %8s\n' "$title" "$s" "" "" "$p" "" "" "$(ratio "$s" "$p")" ""
            else
                printf '%-40s | %9s %9s %9s\n' "$title" "$s" "" ""
            fi
        done
        continue
    fi
    # shellcheck disable=SC2086
    {
        sm=$(median ${MSGS[$sc,submitd]}); sp=$(median ${P99[$sc,submitd]}); sd=$(median ${DLV[$sc,submitd]})
    }
    if [ -n "$PEER" ]; then
        # shellcheck disable=SC2086
        {
            pm=$(median ${MSGS[$sc,peer]}); pp=$(median ${P99[$sc,peer]}); pd=$(median ${DLV[$sc,peer]})
        }
        printf '%-40s | %9s %9s %9s | %9s %9s %9s | %8s %8s\n' "$(scenario_title "$sc")" \
            "$sm" "$sp" "$sd" "$pm" "$pp" "$pd" "$(ratio "$sm" "$pm")" "$(ratio "$sp" "$pp")"
    else
        printf '%-40s | %9s %9s %9s\n' "$(scenario_title "$sc")" "$sm" "$sp" "$sd"
    fi
done
if [ -n "$PEER" ]; then
    echo "ratio msgs/s > 1: submitd faster; ratio p99 < 1: submitd answers sooner; idle ratio < 1: submitd smaller"
fi
