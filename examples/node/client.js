#!/usr/bin/env node
// A minimal embtrain client in Node.js, written from proto/ and docs/protocol.md alone: ListLosses, one Compute
// with float32 embeddings and int64 labels (decoding the loss and the gradient), and a bad request whose
// google.rpc.BadRequest error detail is decoded.
//
//   npm install                      # in examples/node
//   node client.js [target]          # target: host:port (default 127.0.0.1:50051, or EMBTRAIN_TARGET)
//   node client.js [target] --input batch.json --json
//
// --input: {"embeddings": [[...], ...], "labels": [...], "loss": "batch_hard_triplet", "params": {"margin": 0.2}}
// (every field optional; a fixed batch of 8 x 4 is the default). --json prints one JSON object (what
// tests/test_node_client.py compares with the Python SDK) instead of text. EMBTRAIN_TOKEN: a bearer token.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// proto/ holds embtrain/v1/embtrain.proto and the google/rpc files it needs; google/protobuf/*.proto (struct,
// any, duration) come with protobufjs.
const PROTO_DIR = process.env.EMBTRAIN_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');

// keepCase: field names as in the .proto (request_id, not requestId). longs: String keeps int64 exact.
const definition = protoLoader.loadSync('embtrain/v1/embtrain.proto', {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTO_DIR],
});
const embtrain = grpc.loadPackageDefinition(definition).embtrain.v1;

// google.rpc.Status (the grpc-status-details-bin trailer) and the details the server sends in it.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (origin, target) => path.join(PROTO_DIR, target);
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcTypes.lookupType('google.rpc.Status');
const DETAIL_TYPES = {
  'google.rpc.BadRequest': rpcTypes.lookupType('google.rpc.BadRequest'),
  'google.rpc.ErrorInfo': rpcTypes.lookupType('google.rpc.ErrorInfo'),
};

// ---- tensors: dtype, shape, raw little-endian row-major bytes ------------------------------------------------

const ITEM_SIZE = {
  DTYPE_FLOAT16: 2, DTYPE_BFLOAT16: 2, DTYPE_FLOAT32: 4, DTYPE_FLOAT64: 8, DTYPE_INT32: 4, DTYPE_INT64: 8,
  DTYPE_BOOL: 1, DTYPE_UINT8: 1, DTYPE_INT8: 1, DTYPE_INT16: 2,
};

function float32Tensor(rows) {
  const n = rows.length;
  const d = n ? rows[0].length : 0;
  const data = Buffer.alloc(n * d * 4);
  rows.forEach((row, i) => {
    if (row.length !== d) throw new Error(`row ${i} has ${row.length} values, expected ${d}`);
    row.forEach((v, j) => data.writeFloatLE(v, 4 * (i * d + j)));  // rounds to nearest even, like Math.fround
  });
  return { dtype: 'DTYPE_FLOAT32', shape: [n, d], data };
}

function int64Tensor(values) {
  const data = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => data.writeBigInt64LE(BigInt(v), 8 * i));
  return { dtype: 'DTYPE_INT64', shape: [values.length], data };
}

// A received float32 tensor: its shape as numbers and its values, after checking the byte length.
function decodeFloat32(t, name) {
  if (t.dtype !== 'DTYPE_FLOAT32') throw new Error(`${name}: expected DTYPE_FLOAT32, got ${t.dtype}`);
  const shape = t.shape.map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  if (t.data.length !== count * ITEM_SIZE[t.dtype]) {
    throw new Error(`${name}: ${t.data.length} bytes for shape [${shape}]`);
  }
  const values = new Array(count);
  for (let i = 0; i < count; i++) values[i] = t.data.readFloatLE(4 * i);
  return { shape, values };
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

function decodeError(err) {
  const out = { code: grpc.status[err.code] || String(err.code), message: err.details, violations: [], info: [] };
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return out;
  const status = Status.decode(raw);
  for (const any of status.details) {
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

// ---- calls ----------------------------------------------------------------------------------------------------

function call(client, method, request) {
  const metadata = new grpc.Metadata();
  if (process.env.EMBTRAIN_TOKEN) metadata.set('authorization', `Bearer ${process.env.EMBTRAIN_TOKEN}`);
  const deadline = new Date(Date.now() + 60_000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function defaultBatch() {
  // 8 rows of width 4, four classes: a fixed batch that needs no input file.
  const embeddings = [];
  for (let i = 0; i < 8; i++) embeddings.push([0, 1, 2, 3].map((j) => Math.fround(Math.sin(1 + 7 * i + 3 * j))));
  return { embeddings, labels: [0, 0, 1, 1, 2, 2, 3, 3], loss: 'batch_hard_triplet', params: { margin: 0.2 } };
}

function computeRequest(batch, labels) {
  return {
    request_id: 'node-example',
    loss: { name: batch.loss, params: toStruct(batch.params) },
    inputs: { embeddings: float32Tensor(batch.embeddings), labels: int64Tensor(labels) },
    options: { gradient: true, triplets: true },
  };
}

function hex64(x) {
  const b = Buffer.alloc(8);
  b.writeDoubleLE(x);
  return b.toString('hex');
}

async function main() {
  const args = process.argv.slice(2);
  const json = args.includes('--json');
  const inputAt = args.indexOf('--input');
  const positional = args.filter((a, i) => !a.startsWith('--') && (inputAt < 0 || i !== inputAt + 1));
  const target = positional[0] || process.env.EMBTRAIN_TARGET || '127.0.0.1:50051';
  const batch = { ...defaultBatch(), ...(inputAt >= 0 ? JSON.parse(fs.readFileSync(args[inputAt + 1], 'utf8')) : {}) };

  const client = new embtrain.EmbeddingTrainer(target, grpc.credentials.createInsecure());
  const report = {};
  try {
    // ListLosses: every loss with its inputs (kinds and accepted DType values) and parameters.
    const listed = await call(client, 'ListLosses', {});
    report.losses = listed.losses.map((l) => l.name);
    report.inputs = Object.fromEntries(listed.losses.map((l) => [l.name, l.inputs.map((i) => i.name)]));
    const wmr = listed.losses.find((l) => l.name === 'weighted_margin_ranking');
    const maxDist = wmr && wmr.params.find((p) => p.name === 'max_dist');
    if (maxDist) report.max_dist_default = String(maxDist.default_number);  // "Infinity": a number, not JSON's

    // One Compute: the loss as a double and d loss / d embeddings in the embeddings' dtype.
    const response = await call(client, 'Compute', computeRequest(batch, batch.labels));
    const gradient = decodeFloat32(response.gradients.embeddings, 'gradients.embeddings');
    report.compute = {
      loss: response.loss, loss_hex: hex64(response.loss), gradient_shape: gradient.shape,
      gradient_hex: response.gradients.embeddings.data.toString('hex'), gradient: gradient.values,
      triplets_total: Number(response.triplets_total), request_id: response.request_id,
    };

    // A bad request: one label short. INVALID_ARGUMENT, with a BadRequest naming inputs.labels.
    try {
      await call(client, 'Compute', computeRequest(batch, batch.labels.slice(1)));
      report.bad_request = null;
    } catch (err) {
      report.bad_request = decodeError(err);
    }
  } finally {
    client.close();
  }

  if (json) {
    process.stdout.write(`${JSON.stringify(report)}\n`);
    return;
  }
  console.log(`${report.losses.length} losses: ${report.losses.slice(0, 6).join(', ')}, ...`);
  if (report.max_dist_default) console.log(`weighted_margin_ranking max_dist default: ${report.max_dist_default}`);
  const c = report.compute;
  console.log(`${batch.loss}: loss ${c.loss}, gradient [${c.gradient_shape}], ${c.triplets_total} active triplets`);
  console.log(`  gradient row 0: ${c.gradient.slice(0, c.gradient_shape[1]).join(', ')}`);
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
