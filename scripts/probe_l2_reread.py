"""How fast a GPU can read two arrays once from memory, read them again from L2 a few tiles later,
and write a third: the memory traffic of a scan that computes each tile's map on a first read and
replays it, once its carry-in is known, on a second read served by L2. No scan is computed: the
probe times the traffic alone, as an upper bound for such a design, against a single read (the
traffic of a scan that holds its tiles on chip).

A persistent grid (blocks per SM x SMs) walks tiles of U 16-byte vectors per thread and array; in
its step i a block reads tile i * grid + block of x and r ("first read") and re-reads tile
(i - D) * grid + block ("second read", D = 0: none, each tile read once), then writes that tile of y.
POL picks cache hints: 0 none; 1 first reads kept in L2 (evict_last), second reads and the writes
marked evict_first.

Usage (CUDA machine with CuPy): python3 scripts/probe_l2_reread.py [--mib 64 128] [--out FILE]
Prints a table: GB/s counted as 3 array passes (x, r read, y written) and % of copy bandwidth.
"""

import argparse

import cupy as cp
import numpy as np

SOURCE = r"""
#ifndef POL
#define POL 0
#endif
__device__ __forceinline__ unsigned long long policy_last() {
    unsigned long long p;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ unsigned long long policy_first() {
    unsigned long long p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ uint4 load(const uint4* p, unsigned long long pol, bool hint) {
    uint4 v;
    if (POL && hint)
        asm volatile("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(pol));
    else
        asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ void store(uint4* p, uint4 v, unsigned long long pol) {
    if (POL)
        asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;"
                     :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(pol) : "memory");
    else
        asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                     :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

extern "C" __global__ void __launch_bounds__(256, MINB)
probe(const uint4* __restrict__ x, const uint4* __restrict__ r, uint4* __restrict__ y, long long n_tiles,
      unsigned* sink) {
    const long long grid = gridDim.x, tile_vecs = 256LL * VECS;
    const unsigned long long keep = policy_last(), drop = policy_first();
    unsigned acc = 0;
    for (long long i = 0;; ++i) {
        const long long ta = i * grid + blockIdx.x, tb = (i - LAG) * grid + blockIdx.x;
        if (tb >= n_tiles) break;
        uint4 a[VECS], b[VECS], c[VECS], d[VECS];
        if (LAG > 0 && ta < n_tiles) {
#pragma unroll
            for (int u = 0; u < VECS; ++u) {
                const long long at = ta * tile_vecs + u * 256 + threadIdx.x;
                a[u] = load(x + at, keep, true);
                b[u] = load(r + at, keep, true);
            }
        }
        if (tb >= 0) {
#pragma unroll
            for (int u = 0; u < VECS; ++u) {
                const long long at = tb * tile_vecs + u * 256 + threadIdx.x;
                c[u] = load(x + at, drop, LAG > 0);
                d[u] = load(r + at, drop, LAG > 0);
            }
        }
        if (LAG > 0 && ta < n_tiles) {
#pragma unroll
            for (int u = 0; u < VECS; ++u) acc += a[u].x ^ b[u].y ^ a[u].z ^ b[u].w;
        }
        if (tb >= 0) {
#pragma unroll
            for (int u = 0; u < VECS; ++u) {
                const long long at = tb * tile_vecs + u * 256 + threadIdx.x;
                store(y + at, make_uint4(c[u].x + d[u].x, c[u].y + d[u].y, c[u].z + d[u].z, c[u].w + d[u].w), drop);
            }
        }
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the first reads
}
"""


def time_ms(fn, reps=30):
    fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 128], help="MiB per array")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    sms = props["multiProcessorCount"]
    src = cp.random.randint(0, 255, 2**30, dtype=cp.uint8)
    dst = cp.empty_like(src)
    copy = 2 * src.nbytes / time_ms(lambda: dst.__setitem__(slice(None), src)) / 1e6
    del src, dst
    lines = [f"Device: {props['name'].decode()}, {sms} SMs, L2 {props['l2CacheSize'] >> 20} MiB; "
             f"copy {copy:.0f} GB/s (read + write)", "",
             "| MiB/array | blocks/SM | U | D | POL | window MiB (x+r) | ms | GB/s | % copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    sink = cp.zeros(1, dtype=cp.uint32)
    for mib in args.mib:
        n = mib << 20
        x = cp.random.randint(0, 2**31, n // 4, dtype=cp.int32)
        r = cp.random.randint(0, 2**31, n // 4, dtype=cp.int32)
        y = cp.empty_like(x)
        for minb, U in ((2, 4), (2, 6), (1, 8), (1, 12)):
            for D, pol in ((0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 1), (4, 1)):
                opts = ("-std=c++17", f"-DVECS={U}", f"-DLAG={D}", f"-DPOL={pol}", f"-DMINB={minb}")
                fn = cp.RawModule(code=SOURCE, options=opts).get_function("probe")
                grid = sms * minb
                tile = 256 * U * 16
                n_tiles = n // tile
                ms = time_ms(lambda: fn((grid,), (256,), (x, r, y, np.int64(n_tiles), sink)))
                gbs = 3 * n_tiles * tile / ms / 1e6
                # x and r read between a tile's first read and its second: D steps of the whole grid
                window = f"{2 * D * grid * tile / 2**20:.1f}" if D else "-"
                line = (f"| {mib} | {minb} | {U} | {D} | {pol} | {window} | {ms:.3f} "
                        f"| {gbs:.0f} | {100 * gbs / copy:.1f} |")
                lines.append(line)
                print(line, flush=True)
        del x, r, y
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
