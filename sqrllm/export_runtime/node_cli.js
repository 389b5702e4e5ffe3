// The WebAssembly build of the CLI under Node.js: node node_cli.js [options] [PROMPT]  (see cli.cpp)
// The wasm file is handed over as bytes: this emscripten would otherwise fetch() it, which Node
// cannot do for a file path.
const fs = require("fs");
const path = require("path");
const createSqrllm = require("./web/sqrllm.js");

createSqrllm({
  arguments: process.argv.slice(2),
  wasmBinary: fs.readFileSync(path.join(__dirname, "web", "sqrllm.wasm")),
  quit: (status) => { process.exitCode = status; },
});
