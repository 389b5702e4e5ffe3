// The runtime of an exported SqrLLM: the model step, sampling, the tokenizer and the C ABI.
//
// model.cpp (written by sqrllm.export) holds the weights and a description of the blocks, then
// includes this header once. Weights are bfloat16 bit patterns; everything is computed in float32
// in a fixed order (no fast-math, no fused multiply-add), so the native and WebAssembly builds
// produce the same numbers. Native builds split each matrix's rows between two threads (see Pool);
// every row is still summed by one thread in one order, so the bits do not depend on it.
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
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>
#if defined(__wasm_simd128__)
#include <wasm_simd128.h>
#endif
// WebAssembly runs on one thread (no SharedArrayBuffer needed); -DSQ_ONE_THREAD does so natively.
#if !defined(__EMSCRIPTEN__) && !defined(SQ_ONE_THREAD)
#define SQ_THREADS 1
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
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
    int reset_token;  // reset_at_eot: every sqrll layer's memory restarts at this token (its end-of-text); -1 none
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

// One step of a sqrll layer after its projection z = (f, i, ig, og), each (n,), for columns
// [c0, c1): the scan's y[t] = r[t] * y[t-1] + x[t] with r = sigmoid(f), x = i * sigmoid(ig), on the
// memory y in place; then g = softsign(y) * sigmoid(og), the input of the layer's out projection.
SQ_HOT static void sqrll_gates(float* __restrict g, float* __restrict y, const float* __restrict z, int n, int c0,
                               int c1) {
    const float *f = z, *in = z + n, *ig = z + 2 * n, *og = z + 3 * n;
    for (int c = c0; c < c1; c++) {
        const float r = sigmoid(f[c]);
        y[c] = r * y[c] + in[c] * sigmoid(ig[c]);
        g[c] = (y[c] / (1.0f + std::fabs(y[c]))) * sigmoid(og[c]);
    }
}

// The gated MLP's hidden layer from its projection z = (a, g), each (n,), for columns [c0, c1): a * sigmoid(g).
SQ_HOT static void mlp_gates(float* __restrict h, const float* __restrict z, int n, int c0, int c1) {
    for (int c = c0; c < c1; c++) h[c] = z[c] * sigmoid(z[n + c]);
}

// Rows [o0, o1) of y = W x + b; xe, xo: x split by split_columns.
SQ_HOT static void rows(float* y, const Linear& L, const float* x, const float* xe, const float* xo, int o0, int o1) {
    const int n = L.n_in;
    int o = o0;
    for (; o + 4 <= o1; o += 4) dot_rows<4>(y + o, L.w + (size_t)o * n, n, x, xe, xo);
    for (; o < o1; o++) dot_rows<1>(y + o, L.w + (size_t)o * n, n, x, xe, xo);
    if (L.b)
        for (o = o0; o < o1; o++) y[o] += bf16(L.b[o]);
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

static double seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A phase of a step (one matrix and what goes with it) covers a range [0, n) of rows or columns,
// cut into CHUNKS parts at multiples of 16 (a 64-byte line of floats). Two, one per thread: more
// would balance a slow core better but cost more hand-overs; four measured no faster on 2 vCPUs.
static constexpr int CHUNKS = 2;
static inline int chunk_start(int n, int k) { return k == CHUNKS ? n : (int)((int64_t)n * k / CHUNKS) & ~15; }

#if defined(SQ_THREADS)
static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Two threads, the caller (thread 0) and one worker (thread 1), run the same step program: phase
// after phase, each claims chunks, waits for the previous phase to be done (by both) before its first
// chunk, and computes its own copy of the phase's input (an RMSNorm, the column split), which costs
// less than handing it over. Thread 0 claims from the first chunk up and thread 1 from the last down,
// so each keeps its half of the weights in its own cache, and either takes all the chunks when the
// other is late: a worker that the OS has not scheduled (the other core is busy) does not stall the
// step; one put aside in the middle of a chunk still does, which Runtime::pick_threads answers.
// Between steps the worker spins (the next comes within microseconds while tokens are generated);
// after SPIN_S without one it sleeps, so that it leaves the core to others while one thread runs.
class Pool {
  public:
    typedef void (*Program)(void* ctx, Pool& pool, int thread);

    // Runs program(ctx, pool, 0) here and program(ctx, pool, 1) on the worker, over n_phases phases;
    // returns when all are done. program and ctx must be the same at every call. Without a worker
    // (the system would not start one) the caller does every chunk.
    void run(Program program, void* ctx, int n_phases) {
        if (!claims) {
            program_ = program, ctx_ = ctx, n_phases_ = n_phases;
            claims.reset(new Slot[n_phases]);
            done.reset(new Slot[n_phases]);
            try {
                worker = std::thread([this] { work(); });
            } catch (const std::system_error&) {
            }
        }
        const uint64_t s = ++current;
        for (int p = 0; p < n_phases_; p++) claims[p].v.store(s << 16 | CHUNKS, std::memory_order_relaxed);
        step.store(s);                // publishes; sequentially consistent with the worker's `sleeping`
        if (sleeping.load()) wake();  // store, so that no wake-up is lost
        program(ctx, *this, 0);
        wait(n_phases_ - 1, 0);
    }

    // A chunk of the phase for this thread, or -1: none left (or the step is over).
    int claim(int phase, int thread) {
        const uint64_t s = thread ? joined : current;
        std::atomic<uint64_t>& c = claims[phase].v;
        uint64_t w = c.load(std::memory_order_acquire);  // step << 16 | first unclaimed << 8 | last + 1
        for (;;) {
            const int front = (int)(w >> 8 & 255), back = (int)(w & 255);
            if (w >> 16 != s || front >= back) return -1;
            if (c.compare_exchange_weak(w, thread ? w - 1 : w + 256, std::memory_order_acq_rel,
                                        std::memory_order_acquire))
                return thread ? back - 1 : front;
        }
    }

    void finish(int phase) { done[phase].v.fetch_add(1, std::memory_order_release); }

    // Until every chunk of the phase is done in this thread's step (done counts across steps).
    void wait(int phase, int thread) {
        const uint64_t target = (thread ? joined : current) * CHUNKS;
        const double t0 = seconds();
        for (int i = 0; done[phase].v.load(std::memory_order_acquire) < target; i++) {
            cpu_relax();
            if (i >= 64 && seconds() - t0 > SPIN_S) std::this_thread::yield();  // the other was put aside
        }
    }

    ~Pool() {
        if (!worker.joinable()) return;
        stop.store(true);
        wake();
        worker.join();
    }

  private:
    static constexpr double SPIN_S = 50e-6;
    struct alignas(64) Slot { std::atomic<uint64_t> v{0}; };  // one per cache line
    std::unique_ptr<Slot[]> claims, done;  // per phase
    alignas(64) std::atomic<uint64_t> step{0};  // the latest step, 1, 2, ...
    uint64_t current = 0;                       // the caller's step
    alignas(64) uint64_t joined = 0;            // the worker's
    Program program_ = nullptr;
    void* ctx_ = nullptr;
    int n_phases_ = 0;
    std::atomic<bool> sleeping{false}, stop{false};
    std::mutex mutex;
    std::condition_variable cv;
    std::thread worker;

    void wake() {
        { std::lock_guard<std::mutex> lock(mutex); }
        cv.notify_one();
    }

    void work() {
        auto has_step = [this] { return step.load() != joined; };
        for (;;) {
            const double t0 = seconds();
            for (int i = 0; !has_step() && !stop.load(std::memory_order_relaxed); i++) {
                cpu_relax();
                if (i >= 64 && seconds() - t0 > SPIN_S) {
                    std::unique_lock<std::mutex> lock(mutex);
                    sleeping.store(true);
                    cv.wait(lock, [&] { return stop.load() || has_step(); });
                    sleeping.store(false);
                }
            }
            if (stop.load()) return;
            joined = step.load(std::memory_order_acquire);  // a late worker joins the latest step
            program_(ctx_, *this, 1);
        }
    }
};
#endif

// Storage on 64-byte boundaries: two threads writing neighbouring ranges of an array (cut at
// multiples of 16 floats) then share no cache line, which would bounce between their cores.
template <class T>
struct CacheLines {
    typedef T value_type;
    CacheLines() = default;
    template <class U>
    CacheLines(const CacheLines<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    bool operator==(const CacheLines&) const { return true; }
    bool operator!=(const CacheLines&) const { return false; }
};
typedef std::vector<float, CacheLines<float>> Floats;

// What each thread of a step has to itself: the input of the current phase's matrix.
struct Lane {
    Floats h;        // (C,) the RMSNorm of x, for a projection from the residual stream
    Floats columns;  // the matrix's input split by split_columns: xe, then xo
    const float *xe = nullptr, *xo = nullptr;
};

struct Runtime {
    bool ready = false;
    Floats x, z, g, tmp;  // activations of one step, shared by its threads
    Lane lanes[2];
    Floats state;         // every sqrll layer's y, then the logits
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
    int threads = 0;   // 0: 1 or 2, whichever has been faster lately (see pick_threads); 1, 2: fixed
    int last_threads = 0;  // what the last step ran on
    int run_threads = 1, run_steps = 0, run_length = SAMPLE, pause = PAUSE;  // pick_threads' state:
    double run_seconds = 0.0, half_seconds = 0.0;  // the run's time (and its first half's)
    double one_thread[3] = {};  // seconds per step of the last 3 runs on one thread
    long n_one_thread = 0;
#if defined(SQ_THREADS)
    Pool pool;
#endif

    void init() {
        const Model& M = MODEL;
        int widest = M.n_embd, n_state = 0;
        mem_offset.assign(M.n_blocks, -1);
        for (int b = 0; b < M.n_blocks; b++) {
            const Block& B = M.blocks[b];
            widest = std::max(widest, std::max(B.proj.n_out, B.out.n_in));
            if (B.kind == SQRLL) mem_offset[b] = n_state, n_state += B.out.n_in;
        }
        x.assign(M.n_embd, 0.0f), tmp.assign(M.n_embd, 0.0f);
        z.assign(widest, 0.0f), g.assign(widest, 0.0f);
        for (Lane& lane : lanes) lane.h.assign(M.n_embd, 0.0f), lane.columns.assign(widest, 0.0f);
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

    // One token through the model, as 2 phases per block (its input projection with the gates; its
    // output projection into the residual stream x) and the head. Each phase is split over a range of
    // rows or columns; each row of a matrix is summed whole by one thread (dot_rows), so the number
    // of threads changes no bits.
    const float* step(int t) {
        const Model& M = MODEL;
        const bool adaptive = threads == 0 && cores() >= 2;
        const int n_threads = adaptive ? pick_threads() : threads ? threads : 1;
        last_threads = n_threads;
        const double t0 = adaptive ? seconds() : 0.0;
        for (int c = 0; c < M.n_embd; c++) x[c] = bf16(M.wte[(size_t)t * M.n_embd + c]);
#if defined(SQ_THREADS)
        if (n_threads > 1) pool.run(program, this, n_phases());
        else
#endif
            for (int p = 0; p < n_phases(); p++) {
                prepare(p, lanes[0]);
                part(p, lanes[0], 0, phase_size(p));
            }
        if (adaptive && run_steps > 1) {
            run_seconds += seconds() - t0;
            if (run_steps == WINDOW / 2) half_seconds = run_seconds;
        }
        return logits;
    }

    int n_phases() const { return 2 * MODEL.n_blocks + 1; }

    // Phase 2b: block b's input projection and gates, over its inner width's columns; phase 2b + 1:
    // its output projection, over C rows; the last: the head, over the vocabulary.
    int phase_size(int p) const {
        const Model& M = MODEL;
        return p == 2 * M.n_blocks ? M.vocab_size : p % 2 ? M.n_embd : M.blocks[p / 2].out.n_in;
    }

    // A thread's own copy of the phase's input: the same arithmetic on every thread.
    void prepare(int p, Lane& lane) {
        const Model& M = MODEL;
        if (p == 2 * M.n_blocks) rmsnorm(lane.h.data(), x.data(), M.norm_f, M.eps_f, M.n_embd);
        else if (p % 2 == 0) rmsnorm(lane.h.data(), x.data(), M.blocks[p / 2].norm, M.blocks[p / 2].eps, M.n_embd);
        const float* v = p % 2 ? g.data() : lane.h.data();
        const int n = p % 2 ? M.blocks[p / 2].out.n_in : M.n_embd;
        lane.xe = lane.columns.data(), lane.xo = lane.columns.data() + n / 2;
        split_columns(lane.columns.data(), lane.columns.data() + n / 2, v, n);
    }

    // Phase p over [begin, end) of its range.
    void part(int p, const Lane& lane, int begin, int end) {
        const Model& M = MODEL;
        if (p == 2 * M.n_blocks) return rows(logits, M.lm_head, lane.h.data(), lane.xe, lane.xo, begin, end);
        const Block& B = M.blocks[p / 2];
        if (p % 2) {  // x += out(g), rows [begin, end)
            rows(tmp.data(), B.out, g.data(), lane.xe, lane.xo, begin, end);
            for (int c = begin; c < end; c++) x[c] += tmp[c];
            return;
        }
        // columns [begin, end) of the inner width n: those rows of each of the projection's 4 (sqrll)
        // or 2 (MLP) stacked matrices, then the gates on those columns
        const int n = B.out.n_in;
        for (int j = 0; j < (B.kind == SQRLL ? 4 : 2); j++)
            rows(z.data(), B.proj, lane.h.data(), lane.xe, lane.xo, j * n + begin, j * n + end);
        if (B.kind == SQRLL) sqrll_gates(g.data(), state.data() + mem_offset[p / 2], z.data(), n, begin, end);
        else mlp_gates(g.data(), z.data(), n, begin, end);
    }

#if defined(SQ_THREADS)
    // A step on one of two threads (see Pool): phase by phase, the chunks this thread claims; before
    // its first chunk of a phase, the previous phase must be done and the thread prepares its input.
    static void program(void* ctx, Pool& pool, int thread) {
        Runtime& r = *(Runtime*)ctx;
        for (int p = 0; p < r.n_phases(); p++) {
            const int n = r.phase_size(p);
            bool prepared = false;
            for (int k; (k = pool.claim(p, thread)) >= 0; pool.finish(p)) {
                const int begin = chunk_start(n, k), end = chunk_start(n, k + 1);
                if (begin == end) continue;
                if (!prepared) {
                    if (p > 0) pool.wait(p - 1, thread);
                    r.prepare(p, r.lanes[thread]);
                    prepared = true;
                }
                r.part(p, r.lanes[thread], begin, end);
            }
        }
    }
#endif

    static int cores() {
#if defined(SQ_THREADS)
        static const int n = (int)std::thread::hardware_concurrency();
        return n;
#else
        return 1;
#endif
    }

    // The automatic thread count (threads == 0, 2 or more cores). Two threads meet twice per block:
    // when the OS puts one aside (another process wants its core), the other waits for it, for a
    // whole time slice at worst. On a busy machine that comes every few milliseconds and makes two
    // threads slower than one, yet a sample of a few steps rarely sees it. So two threads are judged
    // by their mean time per step over a window of WINDOW steps, against one thread's over a sample
    // of SAMPLE steps after each window (the median of the last 3 samples). A lone stall (a virtual
    // machine's core taken away for a few milliseconds) or a lucky sample must not decide it: two
    // threads lose only when both halves of their window are over 10% slower. Then one thread runs
    // for `pause` steps (from PAUSE), two are tried again, and the pause doubles each time they lose
    // (up to MAX_PAUSE). A run's first step, which wakes or parks the worker, is not counted.
    static constexpr int SAMPLE = 16, WINDOW = 256, PAUSE = 1024, MAX_PAUSE = 4096;

    int pick_threads() {
        if (run_steps == run_length) {
            if (run_threads == 1) {
                one_thread[n_one_thread++ % 3] = run_seconds / (run_steps - 1);
                run_threads = 2, run_length = WINDOW;
            } else {
                const int n = (int)std::min(n_one_thread, 3L);
                double sorted[3];
                std::partial_sort_copy(one_thread, one_thread + n, sorted, sorted + n);
                const double bar = 1.1 * sorted[n / 2];
                const double first = half_seconds / (WINDOW / 2 - 1), second = (run_seconds - half_seconds) / (WINDOW / 2);
                const bool lost = first > bar && second > bar;
                run_threads = 1, run_length = lost ? pause : SAMPLE;
                pause = lost ? std::min(2 * pause, MAX_PAUSE) : PAUSE;
            }
            run_steps = 0, run_seconds = 0.0;
        }
        run_steps++;
        return run_threads;
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
    sq::Runtime& r = sq::rt();
    if (token == sq::MODEL.reset_token) std::fill(r.state.data(), r.logits, 0.0f);  // as training's r = 0 there
    return r.step(token);
}
const float* sq_logits(void) { return sq::rt().logits; }

void sq_set_temperature(float temperature) { sq::rt().temperature = temperature; }
void sq_set_top_k(int top_k) { sq::rt().top_k = top_k; }
void sq_set_top_p(float top_p) { sq::rt().top_p = top_p; }
void sq_set_seed(uint32_t seed) { sq::rt().seed(seed); }
void sq_set_threads(int n) {
#if defined(SQ_THREADS)
    sq::rt().threads = n == 1 || n == 2 ? n : 0;
#else
    (void)n;
#endif
}
int sq_threads_used(void) { return sq::rt().last_threads; }
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
