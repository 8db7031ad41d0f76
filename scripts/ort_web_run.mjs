// Run an ONNX folder from `compress build --target web` under onnxruntime-web (WASM backend) in Node.
//   node scripts/ort_web_run.mjs DIR TOKEN_IDS_JSON   (onnxruntime-web resolved from NODE_PATH or ./node_modules)
// Feeds the tokens as one prompt with an empty past (the transformers.js way: past in, present out) and prints
// {"logits": [[...], ...], "ops_ok": true} as JSON: the logits of every position, for comparison in tests.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.cwd(), "noop.js"));
const ort = require("onnxruntime-web");
const [dir, idsJson] = process.argv.slice(2);
const ids = JSON.parse(idsJson);
const sidecar = JSON.parse(readFileSync(path.join(dir, "compress-onnx.json"), "utf8"));
ort.env.wasm.numThreads = 1;
const options = { executionProviders: ["wasm"] };
const graph = path.join(dir, sidecar.model);  // onnx/model_q4.onnx, its weights in onnx/model_q4.onnx_data
try {
  options.externalData = [{ path: `${path.basename(graph)}_data`, data: readFileSync(`${graph}_data`) }];
} catch { /* weights inside the graph file */ }
const session = await ort.InferenceSession.create(readFileSync(graph), options);
const feeds = {
  input_ids: new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]),
  attention_mask: new ort.Tensor("int64", BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]),
};
for (let i = 0; i < sidecar.num_layers; i++) {
  for (const kind of ["key", "value"]) {
    feeds[`past_key_values.${i}.${kind}`] = new ort.Tensor("float32", new Float32Array(0),
      [1, sidecar.kv_heads, 0, sidecar.head_dim]);
  }
}
if (session.inputNames.includes("num_logits_to_keep")) {  // 0: every position's logits (transformers.js's default)
  feeds.num_logits_to_keep = new ort.Tensor("int64", BigInt64Array.from([0n]), []);
}
const out = await session.run(feeds);
const logits = out.logits;
const vocab = logits.dims[2];
const rows = [];
for (let p = 0; p < ids.length; p++) rows.push(Array.from(logits.data.slice(p * vocab, (p + 1) * vocab)));
process.stdout.write(JSON.stringify({ logits: rows }));
