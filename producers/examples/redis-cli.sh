#!/usr/bin/env sh
# Send one request to bales-stream with nothing but redis-cli, and print the reply.
#
#   producers/examples/redis-cli.sh            # Redis on 127.0.0.1:6379
#   REDIS_HOST=10.0.0.5 REDIS_PORT=6380 producers/examples/redis-cli.sh
#
# Env: REDIS_HOST, REDIS_PORT, BALES_PREFIX (default bales), BALES_MODEL (default stub_v1),
#      BALES_TEXT_MODEL (default empty: none; e.g. text_cls_demo from weights/models.toml):
#      then a text request follows, and its reply is printed on a second line.
set -eu
host=${REDIS_HOST:-127.0.0.1}
port=${REDIS_PORT:-6379}
prefix=${BALES_PREFIX:-bales}
model=${BALES_MODEL:-stub_v1}
text_model=${BALES_TEXT_MODEL:-}
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

if [ -n "$text_model" ]; then
  # Text in: encoding=text, the consumer tokenises it (the model declares a tokenizer).
  redis-cli -h "$host" -p "$port" XADD "$prefix:{requests}:p1" '*' \
    request_id "$request_id-text" model_id "$text_model" encoding text timeout_ms 5000 \
    input "Replies are written to a reply key and the entry is acked." >/dev/null
  reply=$(redis-cli -h "$host" -p "$port" --raw BLPOP "$prefix:reply:$request_id-text" 10 | tail -n 1)
  [ -n "$reply" ] || { echo "no reply for $request_id-text within 10 s" >&2; exit 1; }
  echo "$reply"
fi
