// The WebAssembly build of the CLI under Node.js: node node_cli.js [options] [--] [PROMPT]  (see cli.cpp)
// node/sqrllm.js is built with NODERAWFS: stdin, stdout and file paths are Node's, as natively.
// The wasm file is handed over as bytes: this emscripten would otherwise fetch() it, which Node
// cannot do for a file path.
const fs = require("fs");
const path = require("path");
const createSqrllm = require("./node/sqrllm.js");

createSqrllm({
  arguments: process.argv.slice(2),
  wasmBinary: fs.readFileSync(path.join(__dirname, "node", "sqrllm.wasm")),
  quit: (status) => { process.exitCode = status; },
});
