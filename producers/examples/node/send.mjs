// Send requests to bales-stream from Node.js: a plain XADD, then BLPOP on the reply key.
// No bales-specific library: the wire format (docs/wire-format.md) is all you need.
//
//   npm ci && REDIS_URL=redis://127.0.0.1:6379 node send.mjs
//
// Env: REDIS_URL (default redis://127.0.0.1:6379), BALES_PREFIX (default bales),
//      BALES_MODEL (default stub_v1). Prints one reply document per line; exits 1 on
//      an error reply or when no reply arrives within 10 s.
import { crc32 } from 'node:zlib';
import { createClient } from 'redis';

const url = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const prefix = process.env.BALES_PREFIX ?? 'bales';
const modelId = process.env.BALES_MODEL ?? 'stub_v1';
const REPLY_WAIT_S = 10;

const client = createClient({ url });
client.on('error', (err) => console.error('redis error:', err.message));
await client.connect();

// Shards (docs/wire-format.md): the fleet publishes its count; a request goes to shard
// crc32(request_id) % count, whose streams are {requests.<k>} (one shard: {requests}).
const shards = Number((await client.get(`${prefix}:{requests}:shards`)) ?? '1') || 1;

function streamOf(requestId, priority) {
  if (shards === 1) return `${prefix}:{requests}:p${priority}`;
  return `${prefix}:{requests.${crc32(requestId) % shards}}:p${priority}`;
}

async function infer(requestId, fields, priority = 1) {
  await client.xAdd(streamOf(requestId, priority), '*', {
    request_id: requestId,
    model_id: modelId,
    timeout_ms: '5000',
    ...fields,
  });
  const popped = await client.blPop(`${prefix}:reply:${requestId}`, REPLY_WAIT_S);
  if (popped === null) throw new Error(`no reply for ${requestId} within ${REPLY_WAIT_S} s`);
  return JSON.parse(popped.element);
}

const values = Array.from({ length: 128 }, (_, i) => Math.sin(i / 8));
const base = `node-${process.pid}-${Date.now()}`;
let failed = false;
try {
  // 1. JSON input: a JSON array of numbers.
  const viaJson = await infer(`${base}-json`, { input: JSON.stringify(values) }, 0);
  // 2. f32 input: raw little-endian float32 bytes (Float32Array is little-endian on x86/ARM).
  const bytes = Buffer.from(new Float32Array(values).buffer);
  const viaF32 = await infer(`${base}-f32`, { input: bytes, encoding: 'f32' }, 1);
  for (const reply of [viaJson, viaF32]) {
    console.log(JSON.stringify(reply));
    if (reply.status !== 'ok') failed = true;
  }
} catch (err) {
  console.error(err.message);
  failed = true;
} finally {
  await client.quit();
}
process.exit(failed ? 1 : 0);
