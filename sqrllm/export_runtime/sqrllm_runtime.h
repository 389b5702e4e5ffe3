// The runtime of an exported SqrLLM: the model step, sampling, the tokenizer and the C ABI.
//
// model.cpp (written by sqrllm.export) holds the weights and a description of the blocks, then
// includes this header once. Weights are bfloat16 bit patterns; everything is computed in float32
// in a fixed order (no fast-math, no fused multiply-add), so the native and WebAssembly builds
// produce the same numbers.
//
// One step for token t (names as in sqrllm/model.py):
//   x = wte[t]                                                     # (C,)
//   for each block: h = rmsnorm(x) * norm
//     sqrll:  f, i, ig, og = chunk4(proj(h));  y = sigmoid(f) * y + i * sigmoid(ig)
//             x += out(softsign(y) * sigmoid(og))                  # y (n_mem,) is the carried memory
//     mlp:    a, g = chunk2(proj(h));  x += out(a * sigmoid(g))
//   logits = lm_head(rmsnorm(x) * norm_f)                          # (vocab,)
#ifndef SQRLLM_RUNTIME_H
#define SQRLLM_RUNTIME_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>
#if defined(__wasm_simd128__)
#include <wasm_simd128.h>
#endif

#include "sqrllm.h"
#include "sqrllm_sentencepiece.h"

namespace sq {

enum BlockKind { SQRLL = 0, MLP = 1 };
enum TokenizerKind { BYTE = 0, CHAR = 1, SENTENCEPIECE = 2 };

struct Linear {
    const uint16_t* w;  // (n_out, n_in) row-major, as torch.nn.Linear.weight
    const uint16_t* b;  // (n_out,) or nullptr
    int n_out, n_in;
};

struct Block {
    BlockKind kind;
    const uint16_t* norm;  // RMSNorm weight (C,), or nullptr for none
    float eps;
    Linear proj;  // sqrll: C -> 4 n_mem (f, i, ig, og); mlp: C -> 2 n_ffn (a, g)
    Linear out;   // sqrll: n_mem -> C; mlp: n_ffn -> C
};

struct Tokenizer {
    TokenizerKind kind;
    const char* bytes;   // every token's bytes (its text when decoded), concatenated
    const int* offsets;  // token i is bytes[offsets[i] .. offsets[i + 1])
    const SentencePieceSpec* sentencepiece;  // for kind SENTENCEPIECE, else nullptr
};

struct Model {
    int vocab_size, n_embd;
    const uint16_t* wte;  // (vocab, C)
    const Block* blocks;
    int n_blocks;
    const uint16_t* norm_f;
    float eps_f;
    Linear lm_head;  // may share its weight with wte
    Tokenizer tokenizer;
    const char* info;  // JSON for sq_model_info
};

extern const Model MODEL;  // defined in model.cpp

static inline float bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// w . x over n elements: the hot loop. Eight partial sums, lane l taking elements l, l + 8, ...,
// added up in a fixed order; no reassociation, so every build gets the same bits.
static inline float dot(const uint16_t* w, const float* x, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
#if defined(__wasm_simd128__)
    // The same eight lanes as two f32x4 (this clang does not find that form by itself).
    v128_t lo = wasm_f32x4_splat(0.0f), hi = lo;
    for (; i + 8 <= n; i += 8) {
        const v128_t w8 = wasm_v128_load(w + i);  // 8 bfloat16 -> float32: the bits, shifted up
        lo = wasm_f32x4_add(lo, wasm_f32x4_mul(wasm_i32x4_shl(wasm_u32x4_extend_low_u16x8(w8), 16),
                                               wasm_v128_load(x + i)));
        hi = wasm_f32x4_add(hi, wasm_f32x4_mul(wasm_i32x4_shl(wasm_u32x4_extend_high_u16x8(w8), 16),
                                               wasm_v128_load(x + i + 4)));
    }
    wasm_v128_store(acc, lo);
    wasm_v128_store(acc + 4, hi);
#else
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += bf16(w[i + l]) * x[i + l];
#endif
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += bf16(w[i]) * x[i];
    return s;
}

// y = W x + b
static void linear(float* y, const Linear& L, const float* x) {
    for (int o = 0; o < L.n_out; o++) {
        const float s = dot(L.w + (size_t)o * L.n_in, x, L.n_in);
        y[o] = L.b ? s + bf16(L.b[o]) : s;
    }
}

static void rmsnorm(float* h, const float* x, const uint16_t* weight, float eps, int C) {
    float ss = 0.0f;
    for (int c = 0; c < C; c++) ss += x[c] * x[c];
    const float scale = 1.0f / std::sqrt(ss / (float)C + eps);
    for (int c = 0; c < C; c++) h[c] = weight ? (x[c] * scale) * bf16(weight[c]) : x[c] * scale;
}

// A streaming UTF-8 decoder with the replacement rule of Python's errors="replace" and the
// WHATWG TextDecoder: each maximal invalid subsequence becomes one U+FFFD.
struct Utf8Stream {
    unsigned char held[4];
    int n_held = 0, need = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the next continuation byte

    void reset() { n_held = need = 0; }

    void push(unsigned char b, std::string& out) {
        if (need > 0) {
            if (b >= lo && b <= hi) {
                held[n_held++] = b;
                lo = 0x80, hi = 0xBF;
                if (--need == 0) {
                    out.append((const char*)held, n_held);
                    n_held = 0;
                }
                return;
            }
            out += "\xEF\xBF\xBD";
            n_held = need = 0;  // then b starts afresh
        }
        if (b < 0x80) { out += (char)b; return; }
        if (b >= 0xC2 && b <= 0xDF) start(b, 1, 0x80, 0xBF);
        else if (b == 0xE0) start(b, 2, 0xA0, 0xBF);
        else if (b == 0xED) start(b, 2, 0x80, 0x9F);  // no surrogates
        else if (b >= 0xE1 && b <= 0xEF) start(b, 2, 0x80, 0xBF);
        else if (b == 0xF0) start(b, 3, 0x90, 0xBF);
        else if (b >= 0xF1 && b <= 0xF3) start(b, 3, 0x80, 0xBF);
        else if (b == 0xF4) start(b, 3, 0x80, 0x8F);  // up to U+10FFFF
        else out += "\xEF\xBF\xBD";
    }

    void flush(std::string& out) {
        if (need > 0) out += "\xEF\xBF\xBD";
        n_held = need = 0;
    }

  private:
    void start(unsigned char b, int n, unsigned char l, unsigned char h) {
        held[0] = b, n_held = 1, need = n, lo = l, hi = h;
    }
};

// Length of the UTF-8 character starting with byte b (1 for bytes that cannot start one).
static inline int utf8_len(unsigned char b) {
    return b < 0xC0 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

struct Runtime {
    bool ready = false;
    std::vector<float> x, h, z, g, tmp;  // activations of one step
    std::vector<float> state;            // every sqrll layer's y, then the logits
    float* logits = nullptr;
    std::vector<int> mem_offset;  // per block: offset of its y in state (sqrll blocks only)
    float temperature = 0.8f, top_p = 1.0f;
    int top_k = 200;
    uint64_t rng = 0;
    std::vector<int> order;                // sampling scratch
    std::vector<float> probs;
    std::unordered_map<std::string, int> by_text;  // char vocabulary: character -> id
    SentencePiece sentencepiece;
    std::vector<int> encoded;  // encode's scratch
    Utf8Stream utf8;
    std::string text;  // sq_decode's output

    void init() {
        const Model& M = MODEL;
        int widest = M.n_embd, n_state = 0;
        mem_offset.assign(M.n_blocks, -1);
        for (int b = 0; b < M.n_blocks; b++) {
            const Block& B = M.blocks[b];
            widest = std::max(widest, std::max(B.proj.n_out, B.out.n_in));
            if (B.kind == SQRLL) mem_offset[b] = n_state, n_state += B.out.n_in;
        }
        x.assign(M.n_embd, 0.0f), h.assign(M.n_embd, 0.0f), tmp.assign(M.n_embd, 0.0f);
        z.assign(widest, 0.0f), g.assign(widest, 0.0f);
        state.assign(n_state + M.vocab_size, 0.0f);
        logits = state.data() + n_state;
        if (M.tokenizer.kind == CHAR)
            for (int i = 0; i < M.vocab_size; i++) by_text[token(i)] = i;
        if (M.tokenizer.kind == SENTENCEPIECE) sentencepiece.init(M.tokenizer.sentencepiece, M.vocab_size);
        seed(1337);
        ready = true;
    }

    std::string token(int i) const {
        const Tokenizer& T = MODEL.tokenizer;
        return std::string(T.bytes + T.offsets[i], T.offsets[i + 1] - T.offsets[i]);
    }

    void seed(uint32_t s) {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams
        uint64_t v = (uint64_t)s + 0x9E3779B97F4A7C15ull;
        v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ull;
        v = (v ^ (v >> 27)) * 0x94D049BB133111EBull;
        rng = (v ^ (v >> 31)) | 1;
    }

    double uniform() {  // xorshift64*, 53 bits in [0, 1)
        rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
        return (double)((rng * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
    }

    const float* step(int t) {
        const Model& M = MODEL;
        const int C = M.n_embd;
        for (int c = 0; c < C; c++) x[c] = bf16(M.wte[(size_t)t * C + c]);
        for (int b = 0; b < M.n_blocks; b++) {
            const Block& B = M.blocks[b];
            rmsnorm(h.data(), x.data(), B.norm, B.eps, C);
            linear(z.data(), B.proj, h.data());
            if (B.kind == SQRLL) {
                const int n = B.out.n_in;  // n_mem
                const float *f = z.data(), *in = f + n, *ig = in + n, *og = ig + n;
                float* y = state.data() + mem_offset[b];
                for (int c = 0; c < n; c++) {  // the scan's y[t] = r[t] * y[t-1] + x[t], one step
                    const float r = sigmoid(f[c]);
                    y[c] = r * y[c] + in[c] * sigmoid(ig[c]);
                    g[c] = (y[c] / (1.0f + std::fabs(y[c]))) * sigmoid(og[c]);  // softsign(y) * sigmoid(og)
                }
            } else {
                const int n = B.out.n_in;  // n_ffn
                for (int c = 0; c < n; c++) g[c] = z[c] * sigmoid(z[n + c]);
            }
            linear(tmp.data(), B.out, g.data());
            for (int c = 0; c < C; c++) x[c] += tmp[c];
        }
        rmsnorm(h.data(), x.data(), M.norm_f, M.eps_f, C);
        linear(logits, M.lm_head, h.data());
        return logits;
    }

    int sample() {
        const int V = MODEL.vocab_size;
        if (temperature <= 0.0f) {
            int best = 0;
            for (int i = 1; i < V; i++)
                if (logits[i] > logits[best]) best = i;
            return best;
        }
        order.resize(V);
        for (int i = 0; i < V; i++) order[i] = i;
        int n = V;
        auto higher = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
        if (top_k > 0 && top_k < V) {
            std::partial_sort(order.begin(), order.begin() + top_k, order.end(), higher);
            n = top_k;
        } else if (top_p < 1.0f) {
            std::sort(order.begin(), order.end(), higher);
        }
        const float top = logits[*std::max_element(order.begin(), order.begin() + n,
                                                    [&](int a, int b) { return logits[a] < logits[b]; })];
        probs.resize(n);
        double total = 0.0;
        for (int j = 0; j < n; j++) total += probs[j] = std::exp((logits[order[j]] - top) / temperature);
        if (top_p < 1.0f) {  // the smallest head of the sorted list whose mass reaches top_p
            double mass = 0.0;
            for (int j = 0; j < n; j++) {
                mass += probs[j];
                if (mass >= top_p * total) { n = j + 1; break; }
            }
            total = mass;
        }
        double u = uniform() * total;
        for (int j = 0; j < n; j++) {
            u -= probs[j];
            if (u < 0.0) return order[j];
        }
        return order[n - 1];
    }

    int encode(const char* s, int len, int* ids, int max_ids) {
        const Model& M = MODEL;
        if (M.tokenizer.kind == SENTENCEPIECE) {
            encoded.clear();
            sentencepiece.encode(s, len, encoded);
            std::copy(encoded.begin(), encoded.begin() + std::min((int)encoded.size(), std::max(max_ids, 0)), ids);
            return (int)encoded.size();
        }
        int n = 0;
        for (int p = 0; p < len;) {
            int id, step = 1;
            if (M.tokenizer.kind == BYTE) {
                id = (unsigned char)s[p];
            } else {
                step = std::min(utf8_len((unsigned char)s[p]), len - p);
                auto it = by_text.find(std::string(s + p, step));
                if (it == by_text.end()) return -1 - p;
                id = it->second;
            }
            if (n < max_ids) ids[n] = id;
            n++, p += step;
        }
        return n;
    }
};

static Runtime R;

static Runtime& rt() {
    if (!R.ready) R.init();
    return R;
}

}  // namespace sq

extern "C" {

int sq_vocab_size(void) { return sq::MODEL.vocab_size; }
const char* sq_model_info(void) { return sq::MODEL.info; }

void sq_reset(void) {
    sq::Runtime& r = sq::rt();
    std::fill(r.state.begin(), r.state.end(), 0.0f);
    r.utf8.reset();
}

const float* sq_feed(int token) {
    if (token < 0 || token >= sq::MODEL.vocab_size) return nullptr;
    return sq::rt().step(token);
}
const float* sq_logits(void) { return sq::rt().logits; }

void sq_set_temperature(float temperature) { sq::rt().temperature = temperature; }
void sq_set_top_k(int top_k) { sq::rt().top_k = top_k; }
void sq_set_top_p(float top_p) { sq::rt().top_p = top_p; }
void sq_set_seed(uint32_t seed) { sq::rt().seed(seed); }
int sq_sample(void) { return sq::rt().sample(); }

int sq_state_size(void) { return (int)sq::rt().state.size(); }
void sq_save_state(float* dst) { std::copy(sq::rt().state.begin(), sq::rt().state.end(), dst); }
void sq_restore_state(const float* src) {
    sq::Runtime& r = sq::rt();
    std::copy(src, src + r.state.size(), r.state.begin());
}

int sq_encode(const char* text, int n_bytes, int* ids, int max_ids) {
    return sq::rt().encode(text, n_bytes, ids, max_ids);
}

const char* sq_token_bytes(int token, int* n_bytes) {
    const sq::Tokenizer& T = sq::MODEL.tokenizer;
    if (token < 0 || token >= sq::MODEL.vocab_size) {
        *n_bytes = 0;
        return "";
    }
    *n_bytes = T.offsets[token + 1] - T.offsets[token];
    return T.bytes + T.offsets[token];
}

const char* sq_decode(int token, int* n_bytes) {
    sq::Runtime& r = sq::rt();
    r.text.clear();
    if (token < 0) {
        r.utf8.flush(r.text);
    } else {
        int n;
        const char* b = sq_token_bytes(token, &n);
        for (int i = 0; i < n; i++) r.utf8.push((unsigned char)b[i], r.text);
    }
    *n_bytes = (int)r.text.size();
    return r.text.data();
}

}  // extern "C"

#endif
