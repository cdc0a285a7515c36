// Send requests to bales-stream from Node.js: a plain XADD, then BLPOP on the reply key.
// No bales-specific library: the wire format (docs/wire-format.md) is all you need.
//
//   npm ci && REDIS_URL=redis://127.0.0.1:6379 node send.mjs
//
// Env: REDIS_URL (default redis://127.0.0.1:6379), BALES_PREFIX (default bales),
//      BALES_MODEL (default stub_v1), BALES_TEXT_MODEL (default text_embed_demo, from
//      weights/models.toml; empty: skip the text and safetensors requests). Prints one reply
//      document per line; exits 1 on an error reply or when no reply arrives within 10 s.
import { crc32 } from 'node:zlib';
import { createClient } from 'redis';

const url = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const prefix = process.env.BALES_PREFIX ?? 'bales';
const modelId = process.env.BALES_MODEL ?? 'stub_v1';
const textModelId = process.env.BALES_TEXT_MODEL ?? 'text_embed_demo';
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

// A safetensors document (docs/wire-format.md, "Typed inputs"): an 8-byte little-endian
// header length, a JSON header {name: {dtype, shape, data_offsets}}, then each tensor's raw
// little-endian bytes. tensors: {name: {dtype: 'I64' | 'F32' | ..., shape, data: TypedArray}}.
function safetensors(tensors) {
  const header = {};
  const chunks = [];
  let offset = 0;
  for (const [name, { dtype, shape, data }] of Object.entries(tensors)) {
    const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    header[name] = { dtype, shape, data_offsets: [offset, offset + bytes.length] };
    chunks.push(bytes);
    offset += bytes.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const padded = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, ' ')]);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(padded.length));
  return Buffer.concat([size, padded, ...chunks]);
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
  const replies = [viaJson, viaF32];
  if (textModelId) {
    // 3. text input: the consumer tokenises it (the model declares a tokenizer).
    const text = 'Redis streams serve models'; // the same tokens as the ids below
    replies.push(await infer(`${base}-text`, { model_id: textModelId, encoding: 'text', input: text }));
    // 4. safetensors input: token ids and their mask as int64 tensors ([CLS] ... [SEP]).
    const ids = BigInt64Array.from([2n, 168n, 454n, 591n, 253n, 3n]);
    const mask = new BigInt64Array(ids.length).fill(1n);
    const document = safetensors({
      input_ids: { dtype: 'I64', shape: [ids.length], data: ids },
      attention_mask: { dtype: 'I64', shape: [mask.length], data: mask },
    });
    replies.push(
      await infer(`${base}-tensors`, { model_id: textModelId, encoding: 'safetensors', input: document }),
    );
  }
  for (const reply of replies) {
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
