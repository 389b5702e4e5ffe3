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
    int eot_id;  // the end-of-text token, where generated text ends; -1 for none
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

#if defined(__GNUC__)
#define SQ_INLINE inline __attribute__((always_inline))  // into each compiled version of the hot loops
#else
#define SQ_INLINE inline
#endif

static inline float bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// exp in plain float arithmetic (about 1 ulp): the same bits on every platform, whatever its libm,
// and loops that call it vectorize. exp(x) = 2^k exp(r), k = round(x / ln 2), |r| <= ln 2 / 2,
// exp(r) by a degree-7 polynomial (Cephes' expf coefficients).
static SQ_INLINE float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;  // (NaN passes through)
    const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;    // ln 2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = (r * r) * p + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;  // 2^k
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return e * scale;
}

static SQ_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// The hot loop: R rows of W x at once (W row-major bfloat16, n columns). Each row is summed in 16
// lanes, lane j taking columns j, j + 16, j + 32, ...; then lanes are added in a fixed tree:
// p[l] = lane 2l + lane 2l+1, q[k] = p[k] + p[k+4], sum = (q[0] + q[2]) + (q[1] + q[3]); then the
// last n % 16 columns one by one. Nothing is reassociated, so every build gets the same bits; R
// rows give R independent chains of adds.
//
// The vector versions read W as 32-bit words, each holding the bfloat16 of columns 2k and 2k+1:
// `word << 16` is the float of column 2k, `word & 0xFFFF0000` that of column 2k+1. So they keep the
// even lanes and the odd lanes in separate registers, against xe and xo: x's even and odd columns
// of each block of 16 (see split_columns). The plain loop is the reference (-DSQ_PLAIN builds it).
template <int R>
static SQ_INLINE void dot_rows(float* out, const uint16_t* w, int n, const float* x, const float* xe, const float* xo) {
    float q[R][4];
    const int blocks = n / 16;
#if defined(__wasm_simd128__) && !defined(SQ_PLAIN)
    const v128_t high = wasm_i32x4_splat((int32_t)0xFFFF0000u);
    v128_t e0[R], e1[R], o0[R], o1[R];
    for (int r = 0; r < R; r++) e0[r] = e1[r] = o0[r] = o1[r] = wasm_f32x4_splat(0.0f);
    for (int b = 0; b < blocks; b++) {
        const v128_t xe0 = wasm_v128_load(xe + 8 * b), xe1 = wasm_v128_load(xe + 8 * b + 4);
        const v128_t xo0 = wasm_v128_load(xo + 8 * b), xo1 = wasm_v128_load(xo + 8 * b + 4);
        for (int r = 0; r < R; r++) {
            const uint16_t* p = w + (size_t)r * n + 16 * b;
            const v128_t v0 = wasm_v128_load(p), v1 = wasm_v128_load(p + 8);
            e0[r] = wasm_f32x4_add(e0[r], wasm_f32x4_mul(wasm_i32x4_shl(v0, 16), xe0));
            e1[r] = wasm_f32x4_add(e1[r], wasm_f32x4_mul(wasm_i32x4_shl(v1, 16), xe1));
            o0[r] = wasm_f32x4_add(o0[r], wasm_f32x4_mul(wasm_v128_and(v0, high), xo0));
            o1[r] = wasm_f32x4_add(o1[r], wasm_f32x4_mul(wasm_v128_and(v1, high), xo1));
        }
    }
    for (int r = 0; r < R; r++)  // p[0..3] = e0 + o0, p[4..7] = e1 + o1
        wasm_v128_store(q[r], wasm_f32x4_add(wasm_f32x4_add(e0[r], o0[r]), wasm_f32x4_add(e1[r], o1[r])));
#elif defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && !defined(SQ_PLAIN)
    // Eight lanes in one vector: one AVX2 register, or two SSE ones.
    typedef uint32_t u32x8 __attribute__((vector_size(32)));
    typedef float f32x8 __attribute__((vector_size(32)));
    typedef float f32x4 __attribute__((vector_size(16)));
    f32x8 e[R], o[R];
    for (int r = 0; r < R; r++) e[r] = o[r] = f32x8{0, 0, 0, 0, 0, 0, 0, 0};
    for (int b = 0; b < blocks; b++) {
        f32x8 xe8, xo8;
        std::memcpy(&xe8, xe + 8 * b, sizeof xe8);
        std::memcpy(&xo8, xo + 8 * b, sizeof xo8);
        for (int r = 0; r < R; r++) {
            u32x8 words;
            std::memcpy(&words, w + (size_t)r * n + 16 * b, sizeof words);
            const u32x8 lo = words << 16, hi = words & 0xFFFF0000u;
            f32x8 we, wo;
            std::memcpy(&we, &lo, sizeof we);
            std::memcpy(&wo, &hi, sizeof wo);
            e[r] += we * xe8;
            o[r] += wo * xo8;
        }
    }
    for (int r = 0; r < R; r++) {
        const f32x8 p = e[r] + o[r];
        f32x4 p_lo, p_hi;
        std::memcpy(&p_lo, &p, sizeof p_lo);
        std::memcpy(&p_hi, (const char*)&p + sizeof p_lo, sizeof p_hi);
        const f32x4 qr = p_lo + p_hi;
        std::memcpy(q[r], &qr, sizeof qr);
    }
#else
    float even[R][8] = {}, odd[R][8] = {};
    for (int b = 0; b < blocks; b++)
        for (int r = 0; r < R; r++)
            for (int l = 0; l < 8; l++) {
                const int j = 16 * b + 2 * l;
                even[r][l] += bf16(w[(size_t)r * n + j]) * x[j];
                odd[r][l] += bf16(w[(size_t)r * n + j + 1]) * x[j + 1];
            }
    for (int r = 0; r < R; r++)
        for (int k = 0; k < 4; k++) q[r][k] = (even[r][k] + odd[r][k]) + (even[r][k + 4] + odd[r][k + 4]);
#endif
    (void)xe, (void)xo;
    for (int r = 0; r < R; r++) {
        float s = (q[r][0] + q[r][2]) + (q[r][1] + q[r][3]);
        for (int j = 16 * blocks; j < n; j++) s += bf16(w[(size_t)r * n + j]) * x[j];
        out[r] = s;
    }
}

// x's even and odd columns of each block of 16, for dot_rows: xe[8 b + l] = x[16 b + 2 l].
static SQ_INLINE void split_columns(float* xe, float* xo, const float* x, int n) {
    for (int b = 0; b < n / 16; b++)
        for (int l = 0; l < 8; l++) xe[8 * b + l] = x[16 * b + 2 * l], xo[8 * b + l] = x[16 * b + 2 * l + 1];
}

// On x86-64 Linux the hot loop is also compiled for AVX2 and picked at run time: the binary stays
// portable, and the numbers are the same bits. (-DSQ_HOT= builds the baseline version alone.)
#if !defined(SQ_HOT) && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define SQ_HOT __attribute__((target_clones("avx2", "default")))
#elif !defined(SQ_HOT)
#define SQ_HOT
#endif

// One step of a sqrll layer after its projection z = (f, i, ig, og), each (n,): the scan's
// y[t] = r[t] * y[t-1] + x[t] with r = sigmoid(f), x = i * sigmoid(ig), on the memory y in place;
// then g = softsign(y) * sigmoid(og), the input of the layer's out projection.
SQ_HOT static void sqrll_gates(float* __restrict g, float* __restrict y, const float* __restrict z, int n) {
    const float *f = z, *in = z + n, *ig = z + 2 * n, *og = z + 3 * n;
    for (int c = 0; c < n; c++) {
        const float r = sigmoid(f[c]);
        y[c] = r * y[c] + in[c] * sigmoid(ig[c]);
        g[c] = (y[c] / (1.0f + std::fabs(y[c]))) * sigmoid(og[c]);
    }
}

// The gated MLP's hidden layer from its projection z = (a, g), each (n,): a * sigmoid(g).
SQ_HOT static void mlp_gates(float* __restrict h, const float* __restrict z, int n) {
    for (int c = 0; c < n; c++) h[c] = z[c] * sigmoid(z[n + c]);
}

// y = W x + b. scratch: room for n_in floats.
SQ_HOT static void linear(float* y, const Linear& L, const float* x, float* scratch) {
    const int n = L.n_in;
    float *xe = scratch, *xo = scratch + n / 2;
    split_columns(xe, xo, x, n);
    int o = 0;
    for (; o + 4 <= L.n_out; o += 4) dot_rows<4>(y + o, L.w + (size_t)o * n, n, x, xe, xo);
    for (; o < L.n_out; o++) dot_rows<1>(y + o, L.w + (size_t)o * n, n, x, xe, xo);
    if (L.b)
        for (o = 0; o < L.n_out; o++) y[o] += bf16(L.b[o]);
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
    std::vector<float> scratch;          // for linear
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
        z.assign(widest, 0.0f), g.assign(widest, 0.0f), scratch.assign(widest, 0.0f);
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
            linear(z.data(), B.proj, h.data(), scratch.data());
            if (B.kind == SQRLL) {
                const int n = B.out.n_in;  // n_mem
                sqrll_gates(g.data(), state.data() + mem_offset[b], z.data(), n);
            } else {
                mlp_gates(g.data(), z.data(), B.out.n_in);
            }
            linear(tmp.data(), B.out, g.data(), scratch.data());
            for (int c = 0; c < C; c++) x[c] += tmp[c];
        }
        rmsnorm(h.data(), x.data(), M.norm_f, M.eps_f, C);
        linear(logits, M.lm_head, h.data(), scratch.data());
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
int sq_eot_id(void) { return sq::MODEL.tokenizer.eot_id; }
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
