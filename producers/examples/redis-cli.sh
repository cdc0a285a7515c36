#!/usr/bin/env sh
# Send one request to bales-stream with nothing but redis-cli, and print the reply.
#
#   producers/examples/redis-cli.sh            # Redis on 127.0.0.1:6379
#   REDIS_HOST=10.0.0.5 REDIS_PORT=6380 producers/examples/redis-cli.sh
#
# Env: REDIS_HOST, REDIS_PORT, BALES_PREFIX (default bales), BALES_MODEL (default stub_v1).
set -eu
host=${REDIS_HOST:-127.0.0.1}
port=${REDIS_PORT:-6379}
prefix=${BALES_PREFIX:-bales}
model=${BALES_MODEL:-stub_v1}
request_id="cli-$(date +%s)-$$"
# 128 numbers as a JSON array: [0.008,0.016,...,1.000]
input=$(awk 'BEGIN { printf "["; for (i = 1; i <= 128; i++) printf "%s%.3f", (i > 1 ? "," : ""), i / 128; printf "]" }')

# Enqueue at priority 1 (p0 is the highest). '*' lets Redis pick the entry ID.
redis-cli -h "$host" -p "$port" XADD "$prefix:{requests}:p1" '*' \
  request_id "$request_id" model_id "$model" input "$input" timeout_ms 5000 >/dev/null

# Wait up to 10 s for the reply: a LIST with one JSON document (BLPOP prints key, then value).
reply=$(redis-cli -h "$host" -p "$port" --raw BLPOP "$prefix:reply:$request_id" 10 | tail -n 1)
if [ -z "$reply" ]; then
  echo "no reply for $request_id within 10 s (is the service running?)" >&2
  exit 1
fi
echo "$reply"
