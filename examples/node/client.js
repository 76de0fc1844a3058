#!/usr/bin/env node
// A minimal embtrain client in Node.js, written from proto/ and docs/protocol.md alone:
//   - the standard health service (grpc.health.v1.Health/Check),
//   - ListLosses,
//   - one Compute with float32 embeddings and int64 labels (decoding the loss and the float32 gradient),
//   - the same Compute with bfloat16 embeddings (rounded from float32 to nearest even here, in JS; the gradient
//     comes back in bfloat16 and is decoded here),
//   - a ComputeStream of three batches whose middle one is bad (a NaN embedding): answered in-band with
//     ComputeResponse.error, a google.rpc.Status with BadRequest details, while the others are answered normally,
//   - a bad unary request (one label short) whose google.rpc.BadRequest error detail is decoded.
//
//   npm ci                           # in examples/node
//   node client.js [target]          # target: host:port (default 127.0.0.1:50051, or EMBTRAIN_TARGET)
//   node client.js [target] --input batch.json --json
//
// --input: {"embeddings": [[...], ...], "labels": [...], "loss": "batch_hard_triplet", "params": {"margin": 0.2}}
// (every field optional; a fixed batch of 8 x 4 is the default; embeddings are float32 values). --json prints one
// JSON object (what tests/test_node_client.py compares with the Python SDK) instead of text. EMBTRAIN_TOKEN: a
// bearer token (the health service needs none).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// proto/ holds embtrain/v1/embtrain.proto and the google/rpc files it needs; google/protobuf/*.proto (struct,
// any, duration) come with protobufjs. grpc/health/v1/health.proto is the standard health service, which grpc-js
// does not bundle: a copy ships with this example.
const PROTO_DIR = process.env.EMBTRAIN_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');
const EXAMPLE_PROTO_DIR = path.join(__dirname, 'proto');

// keepCase: field names as in the .proto (request_id, not requestId). longs: String keeps int64 exact (the
// default would be a Long object). enums: String gives 'DTYPE_FLOAT32', 'SERVING'.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const definition = protoLoader.loadSync('embtrain/v1/embtrain.proto', { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] });
const embtrain = grpc.loadPackageDefinition(definition).embtrain.v1;
const healthDefinition = protoLoader.loadSync('grpc/health/v1/health.proto',
  { ...LOADER_OPTIONS, includeDirs: [EXAMPLE_PROTO_DIR] });
const healthPkg = grpc.loadPackageDefinition(healthDefinition).grpc.health.v1;

// google.rpc.Status (the grpc-status-details-bin trailer) and the details the server sends in it.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (origin, target) => path.join(PROTO_DIR, target);
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcTypes.lookupType('google.rpc.Status');
const DETAIL_TYPES = {
  'google.rpc.BadRequest': rpcTypes.lookupType('google.rpc.BadRequest'),
  'google.rpc.ErrorInfo': rpcTypes.lookupType('google.rpc.ErrorInfo'),
};
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

// ---- tensors: dtype, shape, raw little-endian row-major bytes ------------------------------------------------

const ITEM_SIZE = {
  DTYPE_FLOAT16: 2, DTYPE_BFLOAT16: 2, DTYPE_FLOAT32: 4, DTYPE_FLOAT64: 8, DTYPE_INT32: 4, DTYPE_INT64: 8,
  DTYPE_BOOL: 1, DTYPE_UINT8: 1, DTYPE_INT8: 1, DTYPE_INT16: 2,
};

function checkRows(rows) {
  const n = rows.length;
  const d = n ? rows[0].length : 0;
  rows.forEach((row, i) => {
    if (row.length !== d) throw new Error(`row ${i} has ${row.length} values, expected ${d}`);
  });
  return [n, d];
}

function float32Tensor(rows) {
  const [n, d] = checkRows(rows);
  const data = Buffer.alloc(n * d * 4);
  rows.forEach((row, i) => row.forEach((v, j) => data.writeFloatLE(v, 4 * (i * d + j))));  // like Math.fround
  return { dtype: 'DTYPE_FLOAT32', shape: [n, d], data };
}

// bfloat16: the upper 16 bits of the float32, rounded to nearest even (docs/protocol.md, "Tensors"). Plain
// truncation (b >>> 16) is a different rounding and gives different losses than torch's .to(torch.bfloat16).
const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

function bfloat16Bits(v) {
  F32[0] = v;  // the float32 value (exact for float32 inputs; a double is rounded to float32 first)
  const b = U32[0];
  if (Number.isNaN(F32[0])) return ((b >>> 16) | 0x0040) & 0xffff;  // stays a NaN (a quiet one)
  // b + 0x8000 stays below 2^32 for every non-NaN b (at most 0xFF808000 for -infinity), so >>> 16 cannot wrap.
  return (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
}

function bfloat16Value(bits) {
  U32[0] = bits * 0x10000;  // the 16 bits in the upper half, zeros below: exact
  return F32[0];
}

function bfloat16Tensor(rows) {
  const [n, d] = checkRows(rows);
  const data = Buffer.alloc(n * d * 2);
  rows.forEach((row, i) => row.forEach((v, j) => data.writeUInt16LE(bfloat16Bits(v), 2 * (i * d + j))));
  return { dtype: 'DTYPE_BFLOAT16', shape: [n, d], data };
}

function int64Tensor(values) {
  const data = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => data.writeBigInt64LE(BigInt(v), 8 * i));
  return { dtype: 'DTYPE_INT64', shape: [values.length], data };
}

// A received float tensor (float32 or bfloat16): its shape as numbers (int64 arrives as strings) and its values,
// after checking the byte length.
function decodeFloat(t, name) {
  const read = {
    DTYPE_FLOAT32: (i) => t.data.readFloatLE(4 * i),
    DTYPE_BFLOAT16: (i) => bfloat16Value(t.data.readUInt16LE(2 * i)),
  }[t.dtype];
  if (!read) throw new Error(`${name}: expected DTYPE_FLOAT32 or DTYPE_BFLOAT16, got ${t.dtype}`);
  const shape = t.shape.map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  if (t.data.length !== count * ITEM_SIZE[t.dtype]) {
    throw new Error(`${name}: ${t.data.length} bytes for shape [${shape}] of ${t.dtype}`);
  }
  const values = new Array(count);
  for (let i = 0; i < count; i++) values[i] = read(i);
  return { dtype: t.dtype, shape, values };
}

// A plain object as a google.protobuf.Struct (proto-loader takes the message form, not JSON). protobufjs bundles
// its own google/protobuf/*.proto with camelCase field names, so Value's fields are numberValue, stringValue, ...
// whatever keepCase says (a snake_case number_value would be dropped without a word).
function toValue(x) {
  if (x === null) return { nullValue: 'NULL_VALUE' };
  if (typeof x === 'number') return { numberValue: x };
  if (typeof x === 'string') return { stringValue: x };
  if (typeof x === 'boolean') return { boolValue: x };
  if (Array.isArray(x)) return { listValue: { values: x.map(toValue) } };
  return { structValue: toStruct(x) };
}

function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj || {})) fields[k] = toValue(v);
  return { fields };
}

// ---- errors: code, message, and the google.rpc details ------------------------------------------------------

// A google.rpc.Status (decoded: {code, message, details: [Any]}) as {code, message, violations, info}. The same
// for a unary call's grpc-status-details-bin trailer and a stream batch's ComputeResponse.error.
function decodeStatus(status) {
  const code = CODE_NAMES[status.code] || String(status.code);
  const out = { code, message: status.message, violations: [], info: [] };
  for (const any of status.details || []) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = DETAIL_TYPES[typeName];
    if (!type) continue;  // a detail this client does not know: skip it
    const detail = type.toObject(type.decode(any.value), { defaults: true });
    if (typeName === 'google.rpc.BadRequest') {
      for (const v of detail.field_violations) out.violations.push({ field: v.field, description: v.description });
    } else {
      out.info.push({ reason: detail.reason, domain: detail.domain, metadata: detail.metadata });
    }
  }
  return out;
}

// A failed unary call: grpc-js's code and message; the details from the trailer (absent for gRPC's own errors).
function decodeError(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  const out = raw ? decodeStatus(Status.decode(raw)) : { violations: [], info: [] };
  return { ...out, code: CODE_NAMES[err.code] || String(err.code), message: err.details };
}

// ---- calls ----------------------------------------------------------------------------------------------------

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.EMBTRAIN_TOKEN) md.set('authorization', `Bearer ${process.env.EMBTRAIN_TOKEN}`);
  return md;
}

function deadline() {
  return new Date(Date.now() + 60_000);
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), { deadline: deadline() },
      (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// ComputeStream: write every request, close the sending side, collect the answers (one per request, in order).
function computeStream(client, requests) {
  return new Promise((resolve, reject) => {
    const responses = [];
    const stream = client.ComputeStream(metadata(), { deadline: deadline() });
    stream.on('data', (response) => responses.push(response));
    stream.on('error', reject);  // a stream-level status (UNAUTHENTICATED, UNAVAILABLE, ...)
    stream.on('end', () => resolve(responses));
    for (const request of requests) stream.write(request);
    stream.end();
  });
}

function defaultBatch() {
  // 8 rows of width 4, four classes: a fixed batch that needs no input file.
  const embeddings = [];
  for (let i = 0; i < 8; i++) embeddings.push([0, 1, 2, 3].map((j) => Math.fround(Math.sin(1 + 7 * i + 3 * j))));
  return { embeddings, labels: [0, 0, 1, 1, 2, 2, 3, 3], loss: 'batch_hard_triplet', params: { margin: 0.2 } };
}

function computeRequest(batch, { requestId = 'node-example', tensor = float32Tensor, embeddings, labels } = {}) {
  return {
    request_id: requestId,
    loss: { name: batch.loss, params: toStruct(batch.params) },
    inputs: { embeddings: tensor(embeddings || batch.embeddings), labels: int64Tensor(labels || batch.labels) },
    options: { gradient: true, triplets: true },
  };
}

function hex64(x) {
  const b = Buffer.alloc(8);
  b.writeDoubleLE(x);
  return b.toString('hex');
}

// A successful ComputeResponse: the loss (and its bits), the gradient's dtype, shape, bytes and values.
function summarize(response) {
  const g = response.gradients.embeddings;
  const gradient = decodeFloat(g, 'gradients.embeddings');
  return {
    request_id: response.request_id, loss: response.loss, loss_hex: hex64(response.loss),
    gradient_dtype: gradient.dtype, gradient_shape: gradient.shape, gradient_hex: g.data.toString('hex'),
    gradient: gradient.values, triplets_total: Number(response.triplets_total),
  };
}

async function main() {
  const args = process.argv.slice(2);
  const json = args.includes('--json');
  const inputAt = args.indexOf('--input');
  const positional = args.filter((a, i) => !a.startsWith('--') && (inputAt < 0 || i !== inputAt + 1));
  const target = positional[0] || process.env.EMBTRAIN_TARGET || '127.0.0.1:50051';
  const batch = { ...defaultBatch(), ...(inputAt >= 0 ? JSON.parse(fs.readFileSync(args[inputAt + 1], 'utf8')) : {}) };

  const client = new embtrain.EmbeddingTrainer(target, grpc.credentials.createInsecure());
  const health = new healthPkg.Health(target, grpc.credentials.createInsecure());
  const report = {};
  try {
    // Health: '' is the server as a whole; the service's own name is answered too. No token needed.
    report.health = (await call(health, 'Check', { service: '' })).status;
    report.health_service = (await call(health, 'Check', { service: 'embtrain.v1.EmbeddingTrainer' })).status;

    // ListLosses: every loss with its inputs (kinds and accepted DType values) and parameters.
    const listed = await call(client, 'ListLosses', {});
    report.losses = listed.losses.map((l) => l.name);
    report.inputs = Object.fromEntries(listed.losses.map((l) => [l.name, l.inputs.map((i) => i.name)]));
    const wmr = listed.losses.find((l) => l.name === 'weighted_margin_ranking');
    const maxDist = wmr && wmr.params.find((p) => p.name === 'max_dist');
    if (maxDist) report.max_dist_default = String(maxDist.default_number);  // "Infinity": a number, not JSON's

    // One Compute in float32: the loss as a double and d loss / d embeddings in float32.
    report.compute = summarize(await call(client, 'Compute', computeRequest(batch)));

    // The same batch in bfloat16: the gradient comes back in bfloat16.
    const bf16 = computeRequest(batch, { requestId: 'node-bfloat16', tensor: bfloat16Tensor });
    report.compute_bf16 = {
      embeddings_hex: bf16.inputs.embeddings.data.toString('hex'),
      ...summarize(await call(client, 'Compute', bf16)),
    };

    // ComputeStream: the batch, the batch with a NaN (a bad batch: answered in-band, the stream goes on), and the
    // batch's first half.
    const withNaN = batch.embeddings.map((row) => row.slice());
    withNaN[1][2] = NaN;
    const half = Math.ceil(batch.embeddings.length / 2);
    const answers = await computeStream(client, [
      computeRequest(batch, { requestId: 'node-stream-0' }),
      computeRequest(batch, { requestId: 'node-stream-1', embeddings: withNaN }),
      computeRequest(batch, { requestId: 'node-stream-2', embeddings: batch.embeddings.slice(0, half),
        labels: batch.labels.slice(0, half) }),
    ]);
    report.stream = answers.map((r) => (r.error ? { request_id: r.request_id, error: decodeStatus(r.error) }
      : summarize(r)));

    // A bad request: one label short. INVALID_ARGUMENT, with a BadRequest naming inputs.labels.
    try {
      await call(client, 'Compute', computeRequest(batch, { labels: batch.labels.slice(1) }));
      report.bad_request = null;
    } catch (err) {
      report.bad_request = decodeError(err);
    }
  } finally {
    client.close();
    health.close();
  }

  if (json) {
    process.stdout.write(`${JSON.stringify(report)}\n`);
    return;
  }
  console.log(`health: ${report.health}`);
  console.log(`${report.losses.length} losses: ${report.losses.slice(0, 6).join(', ')}, ...`);
  if (report.max_dist_default) console.log(`weighted_margin_ranking max_dist default: ${report.max_dist_default}`);
  for (const c of [report.compute, report.compute_bf16]) {
    console.log(`${batch.loss} (${c.gradient_dtype}): loss ${c.loss}, gradient [${c.gradient_shape}], `
      + `${c.triplets_total} active triplets`);
    console.log(`  gradient row 0: ${c.gradient.slice(0, c.gradient_shape[1]).join(', ')}`);
  }
  for (const r of report.stream) {
    if (r.error) {
      console.log(`stream ${r.request_id}: ${r.error.code}: ${r.error.message}`);
      for (const v of r.error.violations) console.log(`  ${v.field}: ${v.description}`);
    } else {
      console.log(`stream ${r.request_id}: loss ${r.loss}`);
    }
  }
  const bad = report.bad_request;
  if (bad) {
    console.log(`bad request: ${bad.code}: ${bad.message}`);
    for (const v of bad.violations) console.log(`  ${v.field}: ${v.description}`);
  }
}

main().catch((err) => {
  const e = err && err.code !== undefined && err.metadata ? decodeError(err) : null;
  console.error(e ? `embtrain: ${e.code}: ${e.message}` : err);
  process.exitCode = 1;
});
