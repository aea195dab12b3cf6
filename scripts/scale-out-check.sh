#!/usr/bin/env bash
# Two `carrot serve` replicas behind nginx on loopback, as a cluster's load balancer would run them:
# answers through the balancer equal a single replica's, both replicas' metrics move, and SIGTERM to
# one replica in the middle of a stream lets that stream finish while new requests go to the other.
#   scripts/scale-out-check.sh        (needs nginx: apt-get install nginx-light; and .venv-test)
# Prints one CHECK line per property and exits non-zero if any fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NGINX="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
[[ -x "$NGINX" ]] || { echo "scale-out-check: nginx not found (apt-get install nginx-light)" >&2; exit 2; }
PY="${CARROT_PYTHON:-$ROOT/.venv-test/bin/python}"
WORK="$ROOT/target/scale-out"
rm -rf "$WORK"; mkdir -p "$WORK/nginx"
cargo build --release --locked -q -p carrot -p carrot-export
target/release/carrot-export --model fixtures/models/carrot-tiny --out "$WORK/model" --dtype fp32 -q >"$WORK/export.log" 2>&1 || { cat "$WORK/export.log" >&2; exit 1; }
cp .cache/llama3-tokenizer/tokenizer.json .cache/llama3-tokenizer/tokenizer_config.json "$WORK/model/"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
A="$(free_port)"; B="$(free_port)"; LB="$(free_port)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; "$NGINX" -p "$WORK/nginx" -c nginx.conf -s stop 2>/dev/null || true; }
trap cleanup EXIT
for port in "$A" "$B"; do
  CARROT_API_KEY=k3y target/release/carrot serve --model "$WORK/model" --port "$port" --drain-timeout 30 \
    >"$WORK/replica-$port.log" 2>&1 &
  pids+=($!)
done
cat >"$WORK/nginx/nginx.conf" <<CONF
daemon on;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events {}
http {
  access_log $WORK/nginx/access.log;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  upstream carrot { server 127.0.0.1:$A; server 127.0.0.1:$B; }
  server {
    listen 127.0.0.1:$LB;
    location / {
      proxy_pass http://carrot;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host localhost;
      proxy_buffering off;
      proxy_read_timeout 600s;
      proxy_next_upstream error timeout;
    }
  }
}
CONF
"$NGINX" -p "$WORK/nginx" -c nginx.conf
"$PY" scripts/scale_out_check.py --balancer "127.0.0.1:$LB" --replicas "127.0.0.1:$A,127.0.0.1:$B" \
  --pids "${pids[0]},${pids[1]}" --image fixtures/images/chelsea.png --key k3y
