// The sqrll scan on the CPU, forward and backward, as sqrllm.scan's CPU path (built by sqrllm/cpu.py):
//
//     y[t] = r[t] * y[t-1] + x[t]          (y[-1] = h0, or 0; reverse: y[t] = r[t] * y[t+1] + x[t])
//
// and, for the forward direction, g[t] = dy[t] + r[t+1] * g[t+1]; dx = g; dr[t] = g[t] * y[t-1];
// dh0 = r[0] * g[0]. (B, T, C) contiguous, float or double, arithmetic in that type.
//
// Each (sequence, block of features) walks time on its own, its state in a small array, so the
// inner loop over features vectorizes and the blocks are shared among threads. The PyTorch loop this
// replaces launched a few ops per time step, which at training sizes cost more than the arithmetic.

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t KB = 256;  // features per block: the state stays in L1 while a block walks time

template <typename F>
void fwd(const F* x, const F* r, const F* h0, F* y, int64_t B, int64_t T, int64_t C, bool reverse,
         int n_threads) {
  const int64_t nkb = (C + KB - 1) / KB;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (B * nkb > 1 && B * T * C > 32768)
  for (int64_t job = 0; job < B * nkb; ++job) {
    const int64_t b = job / nkb, c0 = job % nkb * KB, n = std::min(KB, C - c0);
    F h[KB];
    for (int64_t c = 0; c < n; ++c) h[c] = h0 ? h0[b * C + c0 + c] : F(0);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t at = (b * T + (reverse ? T - 1 - s : s)) * C + c0;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        h[c] = r[at + c] * h[c] + x[at + c];
        y[at + c] = h[c];
      }
    }
  }
}

template <typename F>
void bwd(const F* dy, const F* r, const F* y, const F* h0, F* dx, F* dr, F* dh0, int64_t B, int64_t T,
         int64_t C, bool reverse, int n_threads) {
  const int64_t nkb = (C + KB - 1) / KB;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (B * nkb > 1 && B * T * C > 32768)
  for (int64_t job = 0; job < B * nkb; ++job) {
    const int64_t b = job / nkb, c0 = job % nkb * KB, n = std::min(KB, C - c0);
    F g[KB];
    for (int64_t c = 0; c < n; ++c) g[c] = F(0);
    // s counts steps against the direction of the forward: t is the forward step s steps from its end
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s, at = (b * T + t) * C + c0;
      const bool first = s == T - 1;  // the forward's first step: its y[t-1] was h0
      const int64_t prev = (b * T + (reverse ? t + 1 : t - 1)) * C + c0;  // y[t-1] in the forward's order
      const int64_t next = (b * T + (reverse ? t - 1 : t + 1)) * C + c0;  // r[t+1] in the forward's order
      const F* yp = first ? (h0 ? h0 + b * C + c0 : nullptr) : y + prev;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        g[c] = dy[at + c] + (s ? r[next + c] * g[c] : F(0));
        dx[at + c] = g[c];
        dr[at + c] = yp ? g[c] * yp[c] : F(0);
      }
      if (first)
        for (int64_t c = 0; c < n; ++c) dh0[b * C + c0 + c] = r[at + c] * g[c];
    }
  }
}

}  // namespace

extern "C" {

void sq_scan_fwd_f32(const float* x, const float* r, const float* h0, float* y, int64_t B, int64_t T, int64_t C,
                     int reverse, int n_threads) {
  fwd(x, r, h0, y, B, T, C, reverse != 0, n_threads);
}

void sq_scan_fwd_f64(const double* x, const double* r, const double* h0, double* y, int64_t B, int64_t T,
                     int64_t C, int reverse, int n_threads) {
  fwd(x, r, h0, y, B, T, C, reverse != 0, n_threads);
}

void sq_scan_bwd_f32(const float* dy, const float* r, const float* y, const float* h0, float* dx, float* dr,
                     float* dh0, int64_t B, int64_t T, int64_t C, int reverse, int n_threads) {
  bwd(dy, r, y, h0, dx, dr, dh0, B, T, C, reverse != 0, n_threads);
}

void sq_scan_bwd_f64(const double* dy, const double* r, const double* y, const double* h0, double* dx, double* dr,
                     double* dh0, int64_t B, int64_t T, int64_t C, int reverse, int n_threads) {
  bwd(dy, r, y, h0, dx, dr, dh0, B, T, C, reverse != 0, n_threads);
}

}  // extern "C"
