// Runs the WebAssembly model off the page's thread and streams text back to it.
// page -> worker: {type: "generate", prompt, tokens, temperature, top_k, top_p, seed} | {type: "stop"}
// worker -> page: {type: "ready", info} | {type: "text", text} | {type: "done", tokens, seconds} | {type: "error", message}
importScripts("sqrllm.js");

let M = null;
let job = null;  // the generation in progress
const SLICE_MS = 30;  // generate for this long, then let messages (stop) in

createSqrllm({ noInitialRun: true }).then((module) => {
  M = module;
  postMessage({ type: "ready", info: JSON.parse(M.UTF8ToString(M._sq_model_info())) });
}).catch((e) => postMessage({ type: "error", message: `the model failed to load: ${e}` }));

function encode(text) {
  const bytes = new TextEncoder().encode(text);
  const buf = M._malloc(bytes.length + 1);
  M.HEAPU8.set(bytes, buf);
  let room = bytes.length + 1;
  for (;;) {  // a tokenizer may need more ids than bytes: then ask again with room for all
    const ids = M._malloc(4 * room);
    const n = M._sq_encode(buf, bytes.length, ids, room);
    if (n <= room) {
      const out = n >= 0 ? Array.from(M.HEAP32.subarray(ids >> 2, (ids >> 2) + n)) : n;
      M._free(ids);
      M._free(buf);
      return out;
    }
    M._free(ids);
    room = n;
  }
}

function decode(token, nPtr, decoder) {
  const ptr = M._sq_decode(token, nPtr);
  const n = M.HEAP32[nPtr >> 2];
  return decoder.decode(M.HEAPU8.slice(ptr, ptr + n), { stream: true });
}

function start(req) {
  const ids = encode(req.prompt);
  if (ids.length === 0) return postMessage({ type: "error", message: "the prompt is empty; give at least one character" });
  if (typeof ids === "number") {
    return postMessage({ type: "error", message: `the prompt has a character outside this model's vocabulary at byte ${-1 - ids}` });
  }
  M._sq_set_temperature(req.temperature);
  M._sq_set_top_k(req.top_k);
  M._sq_set_top_p(req.top_p);
  M._sq_set_seed(req.seed >>> 0);
  M._sq_reset();
  for (const t of ids) M._sq_feed(t);
  job = { left: req.tokens, done: 0, seconds: 0, nPtr: M._malloc(4), decoder: new TextDecoder(), eot: M._sq_eot_id() };
  run(job);
}

function finish(j) {
  let ptr = M._sq_decode(-1, j.nPtr);
  const tail = j.decoder.decode(M.HEAPU8.slice(ptr, ptr + M.HEAP32[j.nPtr >> 2]));
  if (tail) postMessage({ type: "text", text: tail });
  M._free(j.nPtr);
  postMessage({ type: "done", tokens: j.done, seconds: j.seconds });
  job = null;
}

function run(j) {
  if (j !== job) return;  // stopped
  const t0 = performance.now();
  let text = "";
  while (j.left > 0 && performance.now() - t0 < SLICE_MS) {
    const token = M._sq_sample();
    if (token === j.eot) {  // the text ends here, as in sample.py
      j.left = 0;
      break;
    }
    text += decode(token, j.nPtr, j.decoder);
    M._sq_feed(token);
    j.left--;
    j.done++;
  }
  j.seconds += (performance.now() - t0) / 1000;
  if (text) postMessage({ type: "text", text });
  if (j.left > 0) setTimeout(() => run(j), 0);
  else finish(j);
}

onmessage = (e) => {
  const msg = e.data;
  if (!M) return postMessage({ type: "error", message: "the model is still loading" });
  if (msg.type === "stop" && job) finish(job);
  else if (msg.type === "generate" && !job) start(msg);
};
