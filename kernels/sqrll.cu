// The sqrll recurrence on CUDA, forward and backward, over contiguous (B, T, C) tensors:
//
//     y[t] = r[t] * y[t-1] + x[t]        (y[-1] = h0, or 0)
//
// Storage is float, half or bfloat16 (`float`, `f16_t`, `bf16_t`); arithmetic is float32.
// Compiled at run time by NVRTC through CuPy (sqrllm/cuda.py); needs no CUDA header.
//
// Work split. A block of NT threads owns a tile: Tc = TT * LR consecutive scan positions by
// CW = CT * V features of one sequence. Its threads form a CT x TT grid: CT across features, each
// thread moving V features with one vector copy per row (16 bytes where C allows), and TT across
// time, each thread owning LR consecutive positions. Inputs are copied straight into shared
// memory (cp.async), so all of a tile's loads are in flight at once without holding registers.
// (Chunk mode may add LX rows per thread held in registers after them: a tile there waits in place
// for its carry-in, so what bounds the bytes in flight is what it can hold.)
// A span of positions acts on the state as an affine map h -> A * h + b (A the product of r, b the
// scan started from 0); maps compose associatively, which is what lets time be split. Within a
// tile, one thread per feature folds the threads' maps through shared memory. Across tiles, one of
// four modes (MODE, a template argument: each mode is its own kernel, carrying only its own code):
// - one tile (ONE_TILE): all of T fits in one tile; one block per (sequence, feature tile) column.
// - loop mode (LOOP): one block walks all of T tile by tile, carrying the state in a register, with
//   two half-size tile buffers so that the next tile's copies are in flight while this one is
//   worked on. Used when the (sequence, feature tile) columns alone fill the GPU.
// - chunk mode (CHUNKS): one block per tile, so long sequences with few features still fill
//   the GPU. Tiles publish maps in global memory as the nodes of a tree of radix R over time: tile k
//   writes its own map, and the map of every node that ends at it (built from the R children
//   before), then folds h0 through the nodes that cover [0, k), longest first. Which nodes, and in
//   what order, depends on k alone, so results are bitwise reproducible (a first-come look-back is
//   not); a tile reads at most (R - 1) log_R(k) nodes, all published by blocks with lower indices,
//   and a node of level j is ready j hops after its last tile is. Every input is read once and
//   every output written once.
// - stream mode (STREAM): where chunk mode's columns are few, a resident grid of a few blocks a
//   column, each walking every Gc-th tile of it, replaying each tile a round after folding it so
//   that its look-back over the column's other blocks' maps overlaps the next tile's copies
//   (scan_stream).
//
// Backward (see sqrllm/scan.py): g[t] = dy[t] + r[t+1] * g[t+1], dx = g, dr[t] = g[t] * y[t-1],
// dh0 = r[0] * g[0]. It is the same scan run the other way, at position p reading the multiplier
// from position p - 1, so the kernel is shared; `flip` maps scan positions to rows (t = T - 1 - p).

#define NT 256  // threads per block; sqrllm/cuda.py's NT
#ifndef POLL
#define POLL 4  // chunk mode: tree nodes a thread waits for at once
#endif
#ifndef FOLD
#define FOLD 8  // per-feature steps: threads' maps read from shared memory at once (a power of two <= 8)
#endif

// Storage types (float, f16_t, bf16_t) and to_f32 / from_f32: kernels/storage.cuh, which
// sqrllm/cuda.py puts in front of this file.

// V storage elements as one load/store of 2, 4, 8 or 16 bytes
template <int BYTES> struct RawOf;
template <> struct RawOf<2> { typedef unsigned short T; };
template <> struct RawOf<4> { typedef unsigned int T; };
template <> struct RawOf<8> { typedef uint2 T; };
template <> struct RawOf<16> { typedef uint4 T; };

// The V values of a vector as floats, taken word by word (a bf16 in the high half of a word is a
// float once the low half is masked off).
__device__ __forceinline__ unsigned word_of(unsigned r, int) { return r; }
__device__ __forceinline__ unsigned word_of(uint2 r, int i) { return i ? r.y : r.x; }
__device__ __forceinline__ unsigned word_of(uint4 r, int i) { return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w; }
__device__ __forceinline__ void split(bf16_t, unsigned w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void split(f16_t, unsigned w, float& lo, float& hi) {
    lo = to_f32(f16_t{(unsigned short)w});
    hi = to_f32(f16_t{(unsigned short)(w >> 16)});
}
template <typename S, int V, typename R> __device__ __forceinline__ void unpack(R raw, float (&f)[V]) {
    if constexpr (sizeof(S) == 4) {
#pragma unroll
        for (int v = 0; v < V; ++v) f[v] = __uint_as_float(word_of(raw, v));
    } else if constexpr (V == 1) {
        f[0] = to_f32(S{(unsigned short)raw});
    } else {
#pragma unroll
        for (int i = 0; i < V / 2; ++i) split(S{}, word_of(raw, i), f[2 * i], f[2 * i + 1]);
    }
}

// V floats stored as S with one vector store. (Storing a union of the vector and its elements, or a
// uint4 built from the words, compiles to one store per element or word: the compiler cannot prove
// the alignment.)
__device__ __forceinline__ unsigned bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned bits_of(bf16_t v) { return v.u; }
__device__ __forceinline__ unsigned bits_of(f16_t v) { return v.u; }
template <typename S, int V> __device__ __forceinline__ void store_vec(S* p, const float (&f)[V]) {
    if constexpr (sizeof(S) * V == 2) {
        *(unsigned short*)p = (unsigned short)bits_of(from_f32<S>(f[0]));
    } else {
        constexpr int W = sizeof(S) * V / 4, PER = 4 / sizeof(S);  // 32-bit words, elements per word
        unsigned w[W];
#pragma unroll
        for (int i = 0; i < W; ++i) {
            w[i] = bits_of(from_f32<S>(f[i * PER]));
            if constexpr (PER == 2) w[i] |= bits_of(from_f32<S>(f[i * PER + 1])) << 16;
        }
        if constexpr (W == 1)
            *(unsigned*)p = w[0];
        else if constexpr (W == 2)
            asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
        else
            asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                         "r"(w[3])
                         : "memory");
    }
}

// Shared-memory addresses as 32-bit offsets in the shared window, which the copies below take.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned d;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(p));
    return d;
}

// Global -> shared copy of one vector of BYTES that skips registers (cp.async); 2-byte vectors,
// which cp.async cannot move, go through a register.
template <int BYTES> __device__ __forceinline__ void copy_async(unsigned dst, const void* src) {
    if constexpr (BYTES == 2)
        asm volatile("st.shared.u16 [%0], %1;" ::"r"(dst), "h"(*(const unsigned short*)src) : "memory");
    else if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(src), "n"(BYTES) : "memory");
}
// A vector of BYTES zero bytes into shared memory.
template <int BYTES> __device__ __forceinline__ void zero_shared(unsigned dst) {
    if constexpr (BYTES == 2)
        asm volatile("st.shared.u16 [%0], %1;" ::"r"(dst), "h"((unsigned short)0) : "memory");
    else if constexpr (BYTES == 4)
        asm volatile("st.shared.u32 [%0], %1;" ::"r"(dst), "r"(0u) : "memory");
    else if constexpr (BYTES == 8)
        asm volatile("st.shared.v2.u32 [%0], {%1, %1};" ::"r"(dst), "r"(0u) : "memory");
    else
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(dst), "r"(0u) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

// The tree over a column's n tiles has radix R = 2^lg: node i of level j covers tiles
// [i R^j, (i + 1) R^j). Levels are stored one after another, level j holding floor(n / R^j) nodes.
__device__ __forceinline__ unsigned node_slot(unsigned n, int lg, int j, unsigned i) {
    unsigned base = 0;
    for (int l = 0; l < j; ++l) base += n >> (lg * l);
    return base + i;
}

// A node's map is two 64-bit words (value bits, tag 1 in the high half), each written and read
// whole, so a reader that sees both tags has both values; zeroed scratch reads as not written.
// No flag, fence or barrier is involved: each feature's thread publishes and polls its own words.
__device__ __forceinline__ void put_map(ulonglong2* p, float A, float b) {
    const unsigned long long tag = 1ull << 32;
    asm volatile("st.relaxed.gpu.global.v2.b64 [%0], {%1, %2};" ::"l"(p), "l"(tag | __float_as_uint(A)),
                 "l"(tag | __float_as_uint(b))
                 : "memory");
}
__device__ __forceinline__ unsigned get_map(const ulonglong2* p, float2& m) {
    unsigned long long w0, w1;
    asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];" : "=l"(w0), "=l"(w1) : "l"(p) : "memory");
    m = make_float2(__uint_as_float((unsigned)w0), __uint_as_float((unsigned)w1));
    return (unsigned)((w0 & w1) >> 32);
}

// Wait for the entries whose bits are set in `pending` (of N): load(i) reads entry i and says
// whether it is written yet. Each round reads all that are still missing, in flight at once.
template <int N, class Load> __device__ __forceinline__ void poll(unsigned pending, Load load) {
    while (pending) {
        const unsigned want = pending;  // the loads depend on this snapshot only: all in flight at once
        unsigned got = 0;
#pragma unroll
        for (int i = 0; i < N; ++i)
            if ((want >> i) & 1) got |= (unsigned)load(i) << i;
        pending = want & ~got;
    }
}

// Hand the maps of `count` nodes to use(map), in order: next() names each node's slot. Nodes are
// waited for POLL at a time.
template <class Next, class Use>
__device__ __forceinline__ void for_nodes(const ulonglong2* nodes, long long stride, int count, Next next,
                                          Use use) {
    for (int i0 = 0; i0 < count; i0 += POLL) {
        const int cnt = min(POLL, count - i0);
        unsigned sl[POLL];
        float2 m[POLL];
#pragma unroll
        for (int i = 0; i < POLL; ++i) sl[i] = i < cnt ? next() : 0;
        poll<POLL>((1u << cnt) - 1, [&](int i) { return get_map(nodes + (long long)sl[i] * stride, m[i]) != 0; });
#pragma unroll
        for (int i = 0; i < POLL; ++i)
            if (i < cnt) use(m[i]);
    }
}

// With TRACE defined (scripts/trace_scan.py), thread 0 of each of the first TRACE blocks records, for
// its first tile, the global nanosecond timer at: 0 start; 1 inputs loaded and folded; 2 carry-in
// known; 3 outputs issued; in chunk mode also 5 the tree nodes that end at the tile published, and
// 6 the carry-in's first POLL nodes folded; and at 4 its multiprocessor. Without TRACE, no code.
#ifdef TRACE
__device__ unsigned long long sqrll_trace[TRACE][8];
__device__ __forceinline__ void trace_at(int point, long long tile) {
    if (threadIdx.x == 0 && blockIdx.x < TRACE && tile == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        sqrll_trace[blockIdx.x][point] = t;
        if (point == 0) {
            unsigned sm;
            asm("mov.u32 %0, %%smid;" : "=r"(sm));
            sqrll_trace[blockIdx.x][4] = sm;
        }
    }
}
// Stream mode instead records, on thread 0 of each block and for each of its first TRACE_ROUNDS
// iterations m: 0 the iteration's start; 1 its own copies of tile m landed; 2 tile m's map published
// (its feature's); 3 tile m - 1's carry-in known to every thread; 4 its outputs of tile m - 1 issued.
#define TRACE_ROUNDS 64
__device__ unsigned long long sqrll_stream_trace[NT * 4][TRACE_ROUNDS][5];
__device__ __forceinline__ void stream_trace_at(int point, long long m) {
    if (threadIdx.x == 0 && blockIdx.x < NT * 4 && m < TRACE_ROUNDS) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        sqrll_stream_trace[blockIdx.x][m][point] = t;
    }
}
#else
__device__ __forceinline__ void trace_at(int, long long) {}
__device__ __forceinline__ void stream_trace_at(int, long long) {}
#endif

// Chunk mode, for one feature: publish tile k's nodes and return the state entering the tile.
// (A, b) is the tile's map for this feature, h the state entering the sequence, and `nodes` points
// at this column and feature: node slot s is nodes[s * stride].
__device__ float chunk_carry_in(float A, float b, float h, unsigned k, unsigned n, int lg,
                                long long stride, ulonglong2* nodes) {
    const unsigned R = 1u << lg;
    put_map(nodes + (long long)node_slot(n, lg, 0, k) * stride, A, b);
    // a node of level j >= 1 ends at tile k when R^j divides k + 1: its R - 1 level-(j-1)
    // children before ours, then ours (A, b)
    for (int j = 1; lg * j < 32 && (k + 1) % (1u << (lg * j)) == 0; ++j) {
        unsigned child = node_slot(n, lg, j - 1, ((k + 1) >> (lg * (j - 1))) - R);
        float cA = 1.f, cb = 0.f;
        for_nodes(nodes, stride, R - 1, [&] { return child++; }, [&](float2 m) {
            cb = fmaf(m.x, cb, m.y);
            cA *= m.x;
        });
        b = fmaf(A, cb, b);
        A *= cA;
        put_map(nodes + (long long)node_slot(n, lg, j, ((k + 1) >> (lg * j)) - 1) * stride, A, b);
    }
    trace_at(5, 0);
    // h through the nodes that cover [0, k), longest first: k's digits in base R, high to low
    int count = 0;
    for (unsigned x = k; x; x >>= lg) count += x & (R - 1);
    unsigned s = 0;
    int folded = 0;  // (for TRACE)
    for_nodes(nodes, stride, count, [&] {
        const int j = (31 - __clz(k - s)) / lg;
        const unsigned slot = node_slot(n, lg, j, s >> (lg * j));
        s += 1u << (lg * j);
        return slot;
    }, [&](float2 m) {
        h = fmaf(m.x, h, m.y);
        if (++folded == min(POLL, count)) trace_at(6, 0);
    });
    return h;
}

extern __shared__ __align__(16) unsigned char dyn_smem[];

// Forward (BWD = false): a = x, out = y; y, dr, dh0 unused.
// Backward (BWD = true): a = dy, y = the forward's output, out = dx; writes dr and dh0.
// nodes: chunk-mode scratch, zeroed, 16 bytes per (tree node, column, feature); lg: the tree's log2 radix.
#define SCAN_PARAMS(S)                                                                          \
    const S *__restrict__ a, const S *__restrict__ r, const S *__restrict__ y,                  \
        const S *__restrict__ h0, S *__restrict__ out, S *__restrict__ dr, S *__restrict__ dh0, \
        ulonglong2 *nodes, long long T, long long C, int CT, int n_ct, int ncol, int n_chunks,  \
        int lg, int head, int flip
#define SCAN_ARGS a, r, y, h0, out, dr, dh0, nodes, T, C, CT, n_ct, ncol, n_chunks, lg, head, flip

// A per-feature step: step(i, m, c) on the maps (sA[i], sB[i]) for i = first, first + stride, ... < end,
// in that order. FOLD of them are read from shared memory before their steps, so the loads issue
// together instead of each waiting in the steps' dependent chain; (end - first) / stride is a
// multiple of FOLD here (NT / CT threads of a feature).
template <typename Step>
__device__ __forceinline__ void each_map(const float* sA, const float* sB, int first, int end, int stride, Step step) {
    for (int i0 = first; i0 < end; i0 += FOLD * stride) {
        float m[FOLD], c[FOLD];
#pragma unroll
        for (int u = 0; u < FOLD; ++u) m[u] = sA[i0 + u * stride], c[u] = sB[i0 + u * stride];
#pragma unroll
        for (int u = 0; u < FOLD; ++u) step(i0 + u * stride, m[u], c[u]);
    }
}

// The element offset of scan position p0 of sequence bi, feature cv (`flip`: positions run back
// from row T - 1).
__device__ __forceinline__ long long position_at(long long bi, long long T, long long C, long long cv, int flip,
                                                 long long p0) {
    return bi * T * C + (flip ? T - 1 - p0 : p0) * C + cv;
}

// Copy this thread's rows p0, p0 + 1, ... (the first `rows` of LR) of a and r (backward: dy, r one
// position back and y one position on, as scan positions run) into shared memory at sa, each array
// ARR = LR * NT vectors after the one before and each row NT vectors after the one before.
// No commit. Returns the offset of row LR, where register rows go on.
template <typename S, typename Raw, int LR, bool BWD>
__device__ __forceinline__ long long copy_rows(const S* __restrict__ a, const S* __restrict__ r,
                                               const S* __restrict__ y, const S* __restrict__ h0, long long T,
                                               long long C, long long bi, long long cv, bool v_ok, int flip,
                                               long long p0, long long rows, unsigned sa) {
    constexpr unsigned ROW = NT * sizeof(Raw), ARR = LR * ROW;
    const long long step = flip ? -C : C;
    long long at = position_at(bi, T, C, cv, flip, p0);  // row l's offset, stepped as l goes
#pragma unroll
    for (int l = 0; l < LR; ++l, at += step, sa += ROW) {
        if (v_ok && l < rows) {
            copy_async<sizeof(Raw)>(sa, a + at);
            if (!BWD) {
                copy_async<sizeof(Raw)>(sa + ARR, r + at);
            } else {  // multiplier from position p - 1, previous output from position p + 1
                if (p0 + l > 0) copy_async<sizeof(Raw)>(sa + ARR, r + (at - step));
                else zero_shared<sizeof(Raw)>(sa + ARR);
                if (p0 + l + 1 < T) copy_async<sizeof(Raw)>(sa + 2 * ARR, y + (at + step));
                else if (h0 != nullptr) copy_async<sizeof(Raw)>(sa + 2 * ARR, h0 + bi * C + cv);
                else zero_shared<sizeof(Raw)>(sa + 2 * ARR);
            }
        }
    }
    return at;
}

// The map (A, B) of this thread's rows l < rows of N (none where !v_ok), whose a and r vectors are
// row_a(l), row_m(l).
// FULL: all N rows are there, so no test per row stands between their loads, which issue together.
template <typename S, int V, int N, bool FULL, class RowA, class RowM>
__device__ __forceinline__ void rows_map(RowA row_a, RowM row_m, bool v_ok, long long rows, float (&A)[V],
                                        float (&B)[V]) {
#pragma unroll
    for (int v = 0; v < V; ++v) A[v] = 1.f, B[v] = 0.f;
#pragma unroll
    for (int l = 0; l < N; ++l) {
        if (FULL || (v_ok && l < rows)) {
            float fa[V], fm[V];
            unpack<S>(row_a(l), fa);
            unpack<S>(row_m(l), fm);
#pragma unroll
            for (int v = 0; v < V; ++v) {
                B[v] = fmaf(fm[v], B[v], fa[v]);
                A[v] *= fm[v];
            }
        }
    }
}

// Replay this thread's rows l < rows of N (all when FULL) from the state g entering them, writing
// out at offset at0 + l * step; backward also writes dr = g * (row_y), and dh0 = r[first row] * g
// at position T - 1 (p0 + l + 1 == T).
template <typename S, int V, int N, bool BWD, bool FULL, class RowA, class RowM, class RowY>
__device__ __forceinline__ void replay_rows(float (&g)[V], RowA row_a, RowM row_m, RowY row_y, bool v_ok, long long rows,
                                            S* __restrict__ out, S* __restrict__ dr, S* __restrict__ dh0,
                                            const S* __restrict__ r, long long at0, long long step,
                                            long long p0, long long T, long long dh0_at) {
    typedef typename RawOf<sizeof(S) * V>::T Raw;
#pragma unroll
    for (int l = 0; l < N; ++l) {
        if (FULL || (v_ok && l < rows)) {
            const long long at = at0 + l * step;
            float fa[V], fm[V];
            unpack<S>(row_a(l), fa);
            unpack<S>(row_m(l), fm);
#pragma unroll
            for (int v = 0; v < V; ++v) g[v] = fmaf(fm[v], g[v], fa[v]);
            store_vec<S, V>(out + at, g);
            if (BWD) {
                float d[V];
                unpack<S>(row_y(l), d);
#pragma unroll
                for (int v = 0; v < V; ++v) d[v] *= g[v];
                store_vec<S, V>(dr + at, d);
                if (p0 + l + 1 == T) {  // dh0 = r[first row] * g[first row]
                    unpack<S>(*(const Raw*)(r + at), d);
#pragma unroll
                    for (int v = 0; v < V; ++v) d[v] *= g[v];
                    store_vec<S, V>(dh0 + dh0_at, d);
                }
            }
        }
    }
}

// Stream mode: a tile's map is one 64-bit word (A's bits low, b's high) in scratch filled with 0xff
// bytes, which no map word reads as (an A of all ones bits, a NaN, is stored as another NaN).
#define UNSET_WORD 0xffffffffu
__device__ __forceinline__ void put_word(unsigned long long* p, float A, float b) {
    unsigned a = __float_as_uint(A);
    a = a == UNSET_WORD ? 0x7fffffffu : a;
    asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"((unsigned long long)__float_as_uint(b) << 32 | a)
                 : "memory");
}
__device__ __forceinline__ unsigned long long get_word(const unsigned long long* p) {
    unsigned long long w;
    asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
    return w;
}
__device__ __forceinline__ bool word_set(unsigned long long w) { return (unsigned)w != UNSET_WORD; }

// Stream mode (STREAM). A resident grid, Gc blocks a (sequence, feature tile) column, one a
// multiprocessor and all running at once (a cooperative launch): block k0 of a column walks tiles
// k0, k0 + Gc, k0 + 2 Gc, ... and publishes each tile's map as soon as it is folded. The state
// entering tile k is then the state leaving this block's previous tile, k - Gc, carried through the
// maps of the Gc - 1 tiles between, which the column's other blocks folded up to a round before.
// To keep that wait off the copies' path, a tile is replayed one round late: iteration m waits for
// tile m's copies, folds it and publishes its map, and only then finishes tile m - 1's look-back
// (issued before the wait) and replays it. Tile m - 1's rows wait for that replay in registers, so
// the two tile buffers hold tile m (folding) and tile m + 1 (in flight) while the look-back waits;
// tile m + 2 is issued into m's buffer once each thread has taken its rows of m into registers. (A
// third buffer, with m - 1 replayed from shared memory, left room for only 8 rows a thread where two
// hold 12.) A feature's look-back is split over the G = NT / CW threads of its slot (up to a warp's
// worth), each folding a contiguous share of the maps, the shares then composed in order by warp
// shuffles: results depend on the tile's index alone, so they are bitwise reproducible. Every input
// is read once, every output written once. LR: rows a thread owns per tile.
#define LOOK 8  // stream mode: look-back maps a thread waits for at once
template <typename S, int V, int LR, bool BWD>
__device__ __forceinline__ void scan_stream(SCAN_PARAMS(S)) {
    typedef typename RawOf<sizeof(S) * V>::T Raw;
    // per thread and feature, [ty][v][cx]: the thread's map, then the map from the tile's start to
    // the thread's first row; hin: per feature slot, the state entering the tile being replayed
    __shared__ float sA[NT * V], sB[NT * V], hin[NT];
    constexpr int BUFFERS = 2, ARRAYS = BWD ? 3 : 2;  // sqrllm/cuda.py's STREAM_BUFFERS
    Raw* const tile_in = (Raw*)dyn_smem;  // BUFFERS buffers of ARRAYS * LR * NT vectors
    constexpr unsigned ARR = LR * NT * sizeof(Raw);

    const int tid = threadIdx.x;
    const int TT = NT / CT, cx = tid % CT, ty = tid / CT, CW = CT * V;
    const long long k0 = blockIdx.x / ncol, Gc = gridDim.x / ncol;
    const int col = blockIdx.x - (int)k0 * ncol;
    const long long bi = col / n_ct, c0 = (long long)(col - bi * n_ct) * CW, cv = c0 + (long long)cx * V;
    const bool v_ok = cv < C;
    const long long step = flip ? -C : C;
    // thread tid serves feature slot fs = tid / G (feature c0 + (fs % CT) * V + fs / CT) as its
    // share p of that slot's look-back; p = 0 also does the slot's per-feature steps
    const int G = NT / CW, fs = tid / G, p = tid % G, GL = min(G, 32);
    const bool fs_ok = c0 + (long long)(fs % CT) * V < C, f_ok = p == 0 && fs_ok;
    const long long n = k0 < n_chunks ? (n_chunks - 1 - k0) / Gc + 1 : 0;  // this block's tiles
    const long long wstride = (long long)ncol * CW;  // from one tile's map words to the next's
    unsigned long long* const words = (unsigned long long*)nodes + (long long)col * CW + fs;

    float carry = 0.f;  // per-feature thread: the state leaving this block's last replayed tile
    if (!BWD && h0 != nullptr && f_ok) carry = to_f32(h0[bi * C + c0 + (fs % CT) * V + fs / CT]);
    // the tile folded last (c) and the one before, awaiting its replay (p): per-feature thread, the
    // tile's map; every thread, the map from the tile's start to its own first row
    float tAc = 1.f, tBc = 0.f, tAp = 1.f, tBp = 0.f, Pc[V], Qc[V], Pp[V], Qp[V];

    // A column's n_chunks tiles, a whole number of rounds (so that every block walks as many): where
    // `head` is set, the first round's Gc tiles hold head positions each (sqrllm/cuda.py's
    // STREAM_SHORT_HEAD says why and what it measured). The other tiles split the rest of T evenly:
    // tile P + j holds q + 1 positions if j < q_rem, else q, at most TT * LR. The threads take LR rows
    // each from the tile's start, the last of them fewer or none.
    const long long P = head ? Gc : 0, rest = T - P * head, q = rest / (n_chunks - P), q_rem = rest % (n_chunks - P);
    auto tile_start = [&](long long k) { return k <= P ? k * head : P * head + (k - P) * q + min(k - P, q_rem); };
    auto first_position = [&](long long m) { return tile_start(k0 + m * Gc) + (long long)ty * LR; };
    auto rows_at = [&](long long m) {  // this thread's rows of tile m
        return max(0ll, min((long long)LR, tile_start(k0 + m * Gc + 1) - first_position(m)));
    };
    auto buffer = [&](long long m) { return tile_in + (int)(m % BUFFERS) * ARRAYS * LR * NT + tid; };
    const unsigned slot0 = smem_u32(tile_in + tid);
    auto issue = [&](long long m) {  // tile m into its buffer (an empty group past the block's tiles)
        if (m < n) copy_rows<S, Raw, LR, BWD>(a, r, y, h0, T, C, bi, cv, v_ok, flip, first_position(m), rows_at(m),
                                              slot0 + (unsigned)(m % BUFFERS) * ARRAYS * ARR);
        copy_async_commit();
    };

    // Tile kt's look-back: this thread's share [e0, e1) of the maps of tiles [kt - Gc + 1, kt).
    // start() issues the reads of its first LOOK maps; finish(h) waits for them, reads the rest and
    // returns h carried through them all (on p = 0).
    long long e0 = 0, e1 = 0;
    unsigned long long w[LOOK];
    auto read = [&](long long e, int i) { return w[i] = get_word(words + (e + i) * wstride), word_set(w[i]); };
    auto start = [&](long long kt) {
        const long long lo = max(0ll, kt - Gc + 1), cnt = kt - lo;
        e0 = lo + cnt * p / GL, e1 = lo + cnt * (p + 1) / GL;
        const int c = (int)min((long long)LOOK, e1 - e0);
#pragma unroll
        for (int i = 0; i < LOOK; ++i)
            if (fs_ok && i < c) read(e0, i);
    };
    auto finish = [&](float h) {
        float A = 1.f, B = 0.f;
        for (long long e = e0; fs_ok && e < e1; e += LOOK) {
            const int c = (int)min((long long)LOOK, e1 - e);
            unsigned pending = (1u << c) - 1;
            if (e == e0) {  // read in start(): only those not yet written then
#pragma unroll
                for (int i = 0; i < LOOK; ++i)
                    if (i < c && word_set(w[i])) pending &= ~(1u << i);
            }
            poll<LOOK>(pending, [&](int i) { return read(e, i); });
#pragma unroll
            for (int i = 0; i < LOOK; ++i)
                if (i < c) {
                    const float mA = __uint_as_float((unsigned)w[i]), mb = __uint_as_float((unsigned)(w[i] >> 32));
                    B = fmaf(mA, B, mb);
                    A *= mA;
                }
        }
        for (int o = 1; o < GL; o <<= 1) {  // share p takes on shares p + o .. p + 2o - 1
            const float A2 = __shfl_down_sync(0xffffffffu, A, o, GL), B2 = __shfl_down_sync(0xffffffffu, B, o, GL);
            if (p % (2 * o) == 0) {
                B = fmaf(A2, B, B2);
                A *= A2;
            }
        }
        return fmaf(A, h, B);
    };

    Raw ca[LR], cm[LR], cy[BWD ? LR : 1];  // this thread's rows of a, r (and y) of the tile awaiting its replay
    issue(0);
    issue(1);
    for (long long m = 0; m <= n; ++m) {
        stream_trace_at(0, m);
        if (m >= 1 && p < GL) start(k0 + (m - 1) * Gc);
        if (m < n) {  // fold tile m and publish its map
            copy_async_wait<1>();  // tile m; tile m + 1 stays in flight
            stream_trace_at(1, m);
            const long long rows = rows_at(m);
            const Raw* ra = buffer(m);
            const Raw* rm = ra + LR * NT;
            float A[V], B[V];
            rows_map<S, V, LR, false>([&](int l) { return ra[l * NT]; }, [&](int l) { return rm[l * NT]; }, v_ok, rows,
                                      A, B);
#pragma unroll
            for (int v = 0; v < V; ++v) {
                sA[(ty * V + v) * CT + cx] = A[v];
                sB[(ty * V + v) * CT + cx] = B[v];
            }
            __syncthreads();
            if (f_ok) {  // the tile's map, and in place of each thread's map the map up to its first row
                float tA = 1.f, tB = 0.f;
                each_map(sA, sB, fs, NT * V, CW, [&](int i, float mA, float mB) {
                    sA[i] = tA;
                    sB[i] = tB;
                    tB = fmaf(mA, tB, mB);
                    tA *= mA;
                });
                tAc = tA, tBc = tB;
                put_word(words + (k0 + m * Gc) * wstride, tA, tB);
            }
            stream_trace_at(2, m);
            __syncthreads();
#pragma unroll
            for (int v = 0; v < V; ++v) {
                Pc[v] = sA[(ty * V + v) * CT + cx];
                Qc[v] = sB[(ty * V + v) * CT + cx];
            }
        }
        if (m >= 1) {  // tile m - 1's carry-in, then its replay
            if (m == n) __syncthreads();  // no fold since the last replay read hin
            float h = 0.f;
            if (p < GL) h = finish(carry);
            if (f_ok) {
                hin[fs] = h;
                carry = fmaf(tAp, h, tBp);
            }
            __syncthreads();
            stream_trace_at(3, m);
            const long long p0 = first_position(m - 1), rows = rows_at(m - 1);
            float g[V];
#pragma unroll
            for (int v = 0; v < V; ++v) g[v] = fmaf(Pp[v], hin[v * CT + cx], Qp[v]);
            replay_rows<S, V, LR, BWD, false>(g, [&](int l) { return ca[l]; }, [&](int l) { return cm[l]; },
                                              [&](int l) { return cy[BWD ? l : 0]; }, v_ok, rows, out, dr, dh0, r,
                                              position_at(bi, T, C, cv, flip, p0), step, p0, T, bi * C + cv);
            stream_trace_at(4, m);
        }
        if (m < n) {  // this thread's rows of tile m into registers, for its replay next iteration
            const Raw* ra = buffer(m);
#pragma unroll
            for (int l = 0; l < LR; ++l) {
                ca[l] = ra[l * NT];
                cm[l] = ra[(LR + l) * NT];
                if constexpr (BWD) cy[l] = ra[(2 * LR + l) * NT];
            }
        }
        issue(m + 2);  // into tile m's buffer, whose rows this thread has just taken
        tAp = tAc, tBp = tBc;
#pragma unroll
        for (int v = 0; v < V; ++v) Pp[v] = Pc[v], Qp[v] = Qc[v];
    }
}

// The four ways of cutting time (sqrllm/cuda.py's plan picks one), each compiled as its own kernel.
#define ONE_TILE 0  // all of T in one tile
#define LOOP 1      // loop mode
#define CHUNKS 2    // chunk mode
#define STREAM 3    // stream mode (scan_stream)

// A register-held row's vector: one plain global load (2-byte vectors through unsigned short).
template <typename Raw> __device__ __forceinline__ Raw load_raw(const void* p) { return *(const Raw*)p; }

// LX (chunk mode): rows a thread holds in registers after its L shared-memory rows, so that a tile
// outgrows shared memory; loaded by plain loads issued beside the tile's cp.async copies.
template <typename S, int V, int L, bool BWD, int MODE, int LX = 0>
__device__ __forceinline__ void scan_tiles(SCAN_PARAMS(S)) {
    typedef typename RawOf<sizeof(S) * V>::T Raw;
    // per thread and feature, [ty][v][cx]: the thread's map (sA, sB), then the state entering it (sA)
    __shared__ float sA[NT * V], sB[NT * V];
    Raw* const tile_in = (Raw*)dyn_smem;  // (BWD ? 3 : 2) * L * NT vectors, filled by cp.async

    const int tid = threadIdx.x;
    const int TT = NT / CT, cx = tid % CT, ty = tid / CT, CW = CT * V;

    // Chunk mode numbers tiles time-major, so that every tile a block waits on has a lower block
    // index: blocks start in index order, so those are running or done.
    const unsigned k = MODE == CHUNKS ? blockIdx.x / ncol : 0;  // tile index along time
    const int col = blockIdx.x - (int)k * ncol;
    const long long bi = col / n_ct;                          // sequence
    const long long c0 = (long long)(col - bi * n_ct) * CW;  // first feature of the tile
    const long long cv = c0 + (long long)cx * V;  // this thread's first feature; V divides C
    const bool v_ok = cv < C;
    // Per-feature steps run on thread f < CW for feature c0 + (f % CT) * V + f / CT, so that
    // consecutive threads touch consecutive shared-memory words.
    const bool f_ok = tid < CW && c0 + (long long)(tid % CT) * V < C;

    float carry = 0.f;  // per-feature thread: the state entering the next tile
    if (!BWD && h0 != nullptr && f_ok) carry = to_f32(h0[bi * C + c0 + (tid % CT) * V + tid / CT]);

    // Each thread owns LR positions of a tile. In loop mode, LR = L / 2 and two buffers alternate:
    // the next tile's copies are in flight while this one is worked on.
    constexpr int LR = MODE == LOOP ? L / 2 : L;
    static_assert(LX == 0 || MODE == CHUNKS, "register rows are for chunk mode");
    constexpr int LT = LR + LX;  // rows a thread owns in a tile: LR in shared memory, then LX in registers
    const long long Tc = (long long)TT * LT;
    const long long n_tiles = MODE == LOOP ? (T + Tc - 1) / Tc : 1;
    const long long step = flip ? -C : C;  // one scan position on, in elements
    constexpr int ARRAYS = BWD ? 3 : 2;
    auto first_position = [&](long long tile) {  // this thread's first position in the tile
        return (MODE == CHUNKS ? (long long)k : tile) * Tc + (long long)ty * LT;
    };
    // the register rows of a, r (and y), zero where a row is missing
    Raw xa[LX > 0 ? LX : 1], xm[LX > 0 ? LX : 1], xy[LX > 0 ? LX : 1];
    auto buffer = [&](int b) { return tile_in + b * ARRAYS * LR * NT + tid; };  // [array][l][tid]
    // buffer(0) as a shared-memory address, and the bytes from one row to the next and one array to the next
    const unsigned slot0 = smem_u32(tile_in + tid);
    constexpr unsigned ROW = NT * sizeof(Raw);
    constexpr unsigned ARR = LR * ROW;
    auto issue = [&](long long tile, int b) {  // copy this thread's rows of a, r (and y) into buffer b
        const long long p0 = first_position(tile);
        long long at = copy_rows<S, Raw, LR, BWD>(a, r, y, h0, T, C, bi, cv, v_ok, flip, p0, min((long long)LR, T - p0),
                                                  slot0 + b * ARRAYS * ARR);
        copy_async_commit();
        if constexpr (LX > 0) {
            const long long rows_all = min((long long)LT, T - p0);
#pragma unroll
            for (int j = 0; j < LX; ++j, at += step) {
                const int l = LR + j;
                xa[j] = xm[j] = xy[j] = Raw{};
                if (v_ok && l < rows_all) {
                    xa[j] = load_raw<Raw>(a + at);
                    if (!BWD) {
                        xm[j] = load_raw<Raw>(r + at);
                    } else {
                        if (p0 + l > 0) xm[j] = load_raw<Raw>(r + (at - step));
                        if (p0 + l + 1 < T) xy[j] = load_raw<Raw>(y + (at + step));
                        else if (h0 != nullptr) xy[j] = load_raw<Raw>(h0 + bi * C + cv);
                    }
                }
            }
        }
    };

    trace_at(0, 0);
    issue(0, 0);
    for (long long tile = 0; tile < n_tiles; ++tile) {
        const int b = MODE == LOOP ? (int)(tile & 1) : 0;
        if (MODE == LOOP && tile + 1 < n_tiles) {
            issue(tile + 1, b ^ 1);
            copy_async_wait<1>();  // all but the copies just issued; each thread reads back only its own
        } else {
            copy_async_wait<0>();
        }
        const long long p0 = first_position(tile);
        const long long rows = min((long long)LT, T - p0);  // positions p0 + l exist for l < rows
        const long long at0 = position_at(bi, T, C, cv, flip, p0);
        const Raw* ra = buffer(b);
        const Raw* rm = ra + LR * NT;
        const Raw* ry = rm + LR * NT;
        // row l of a, r, y: shared memory below LR, registers from there (l is a constant once unrolled)
        auto row_a = [&](int l) { return l < LR ? ra[l * NT] : xa[l - LR]; };
        auto row_m = [&](int l) { return l < LR ? rm[l * NT] : xm[l - LR]; };
        auto row_y = [&](int l) { return l < LR ? ry[l * NT] : xy[l - LR]; };
        const bool full = v_ok && rows == LT;  // all LT rows there: rows_map and replay_rows test none

        // this thread's map over its positions
        {
            float A[V], B[V];
            if (full) rows_map<S, V, LT, true>(row_a, row_m, v_ok, rows, A, B);
            else rows_map<S, V, LT, false>(row_a, row_m, v_ok, rows, A, B);
#pragma unroll
            for (int v = 0; v < V; ++v) {
                sA[(ty * V + v) * CT + cx] = A[v];
                sB[(ty * V + v) * CT + cx] = B[v];
            }
        }
        __syncthreads();
        trace_at(1, tile);

        // per feature: the tile's map, the state entering the tile, then the state entering each thread
        float tA = 1.f, tB = 0.f;
        // (the maps of this thread's feature are at i = (ty * V + v) * CT + cx: from tid, every CW-th)
        if (f_ok) each_map(sA, sB, tid, NT * V, CW, [&](int, float m, float c) { tB = fmaf(m, tB, c); tA *= m; });
        float h = carry;
        if (MODE == CHUNKS && f_ok)
            h = chunk_carry_in(tA, tB, h, k, n_chunks, lg, (long long)ncol * CW, nodes + (long long)col * CW + tid);
        if (f_ok) each_map(sA, sB, tid, NT * V, CW, [&](int i, float m, float c) { sA[i] = h; h = fmaf(m, h, c); });
        carry = h;
        __syncthreads();
        trace_at(2, tile);

        // replay this thread's positions from its entering state and write the outputs
        float g[V];
#pragma unroll
        for (int v = 0; v < V; ++v) g[v] = sA[(ty * V + v) * CT + cx];
        if (full)
            replay_rows<S, V, LT, BWD, true>(g, row_a, row_m, row_y, v_ok, rows, out, dr, dh0, r, at0, step, p0, T, bi * C + cv);
        else
            replay_rows<S, V, LT, BWD, false>(g, row_a, row_m, row_y, v_ok, rows, out, dr, dh0, r, at0, step, p0, T, bi * C + cv);
#ifdef TRACE
        __syncthreads();  // every thread's outputs issued
        trace_at(3, tile);
#endif
        // No barrier before the next tile: a thread copies into and reads back only its own slots of
        // the tile buffers and of sA / sB, and the next tile's per-feature steps touch sA / sB only
        // after its first barrier, which every thread reaches after this replay.
    }
}

// Entry points are made on demand: sqrllm/cuda.py appends one SQRLL_SCAN line per variant it
// launches (storage type, V, L, direction, mode, blocks per multiprocessor the launch bounds promise,
// chunk mode's register rows), so that each variant compiles alone and lands in CuPy's on-disk cache.
#define SQRLL_SCAN(NAME, S, V, L, BWD, MODE, MIN_BLOCKS, LX)                                \
    extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) NAME(SCAN_PARAMS(S)) { \
        if constexpr (MODE == STREAM)                                                   \
            scan_stream<S, V, L, BWD>(SCAN_ARGS);                                       \
        else                                                                            \
            scan_tiles<S, V, L, BWD, MODE, LX>(SCAN_ARGS);                              \
    }

// The textbook design, kept as the benchmark's baseline: one thread per (sequence, feature),
// a serial loop over time.
template <typename S>
__device__ __forceinline__ void fwd_baseline(const S* x, const S* r, const S* h0, S* y, long long B,
                                   long long T, long long C, int reverse) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;  // b * C + c
    if (i >= B * C) return;
    const long long base = (i / C) * T * C + i % C;
    float h = h0 != nullptr ? to_f32(h0[i]) : 0.f;
    for (long long s = 0; s < T; ++s) {
        const long long at = base + (reverse ? T - 1 - s : s) * C;
        h = fmaf(to_f32(r[at]), h, to_f32(x[at]));
        y[at] = from_f32<S>(h);
    }
}

template <typename S>
__device__ __forceinline__ void bwd_baseline(const S* dy, const S* r, const S* y, const S* h0, S* dx, S* dr,
                                   S* dh0, long long B, long long T, long long C, int reverse) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= B * C) return;
    const long long base = (i / C) * T * C + i % C;
    const long long step = reverse ? -C : C;  // one row later in the forward's direction
    float g = 0.f;
    for (long long s = 0; s < T; ++s) {
        const long long at = base + (reverse ? s : T - 1 - s) * C;
        const float m = s > 0 ? to_f32(r[at + step]) : 0.f;
        g = fmaf(m, g, to_f32(dy[at]));
        const float y_prev = s + 1 < T ? to_f32(y[at - step]) : h0 != nullptr ? to_f32(h0[i]) : 0.f;
        dx[at] = from_f32<S>(g);
        dr[at] = from_f32<S>(g * y_prev);
        if (s + 1 == T) dh0[i] = from_f32<S>(to_f32(r[at]) * g);
    }
}

#define SQRLL_BASELINE(S)                                                                        \
    extern "C" __global__ void sqrll_fwd_baseline_##S(const S* x, const S* r, const S* h0, S* y,  \
                                                      long long B, long long T, long long C,    \
                                                      int reverse) {                            \
        fwd_baseline<S>(x, r, h0, y, B, T, C, reverse);                                         \
    }                                                                                           \
    extern "C" __global__ void sqrll_bwd_baseline_##S(const S* dy, const S* r, const S* y,       \
                                                      const S* h0, S* dx, S* dr, S* dh0,         \
                                                      long long B, long long T, long long C,    \
                                                      int reverse) {                            \
        bwd_baseline<S>(dy, r, y, h0, dx, dr, dh0, B, T, C, reverse);                           \
    }
