// Greedy generation from an ONNX folder of `compress build --target web|desktop` with transformers.js in Node.
//   node scripts/transformers_js_generate.mjs DIR TOKEN_IDS_JSON MAX_NEW_TOKENS [TEXT]
// (@huggingface/transformers resolved from ./node_modules: run it with cwd .web/, where `make setup` installs it.)
// Loads the folder the way a transformers.js app does (`AutoModelForCausalLM.from_pretrained`, its dtype and
// external data from config.json's `transformers.js_config`, no options given), on the `cpu` device (onnxruntime-node),
// and prints {"tokens": [...], "last_logits": [...], "dtype": ..., "device": ...}: the new tokens only, and the logits
// at the prompt's last position from one forward call. With TEXT, also "text_ids": TEXT encoded by the folder's
// tokenizer through AutoTokenizer (no special tokens added).
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.cwd(), "noop.js"));
const { env, AutoModelForCausalLM, AutoTokenizer, Tensor } = require("@huggingface/transformers");
const [dir, idsJson, maxNew, text] = process.argv.slice(2);
const ids = JSON.parse(idsJson);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(dir));
const name = path.basename(path.resolve(dir));
const model = await AutoModelForCausalLM.from_pretrained(name, { device: "cpu" });
const input_ids = new Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
const attention_mask = new Tensor("int64", BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]);
const { logits } = await model({ input_ids, attention_mask });
const vocab = logits.dims[2];
const last_logits = Array.from(logits.data.slice((ids.length - 1) * vocab, ids.length * vocab));
const out = await model.generate({ input_ids, attention_mask, max_new_tokens: Number(maxNew), do_sample: false });
const tokens = out.tolist()[0].map(Number).slice(ids.length);
const config = model.config["transformers.js_config"];
const result = { tokens, last_logits, dtype: config.dtype, device: "cpu" };
if (text !== undefined) {
  const tokenizer = await AutoTokenizer.from_pretrained(name);
  result.text_ids = tokenizer.encode(text, { add_special_tokens: false });
}
process.stdout.write(JSON.stringify(result));
