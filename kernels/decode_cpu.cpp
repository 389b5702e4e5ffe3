// One decoding step of a SqrLLM on the CPU, float32, as one call per token: the twin of
// sqrllm.decode.FastStep (same arithmetic, another summation order), built by sqrllm/cpu.py.
//
// A step at batch 1 reads every weight once, so it is bound by memory bandwidth; one core of a
// small machine cannot draw all of it. Each linear layer's output rows are split among OpenMP
// threads, and every thread streams its share of rows. Per block there are two barriers: after
// the input projection (fused with the gates and the recurrence, h = r * h + u) and after the
// output projection (fused with the residual add).
//
// Weights, as sqrllm.decode.NativeStep lays them out: each matrix (out, in) row-major, float32 with
// the preceding RMSNorm's weight folded into its columns, or bfloat16 (the raw 16 bits; every
// parameter of the model rounded to bfloat16, the norms' weights applied to the normalized input,
// as in the exported C++), which halves the bytes a step reads; biases (out,) float32, zeros where
// the model has none. Arithmetic is float32 either way.
// A sqrll layer's input projection has rows [forget, input, input gate, output gate], n_mem each;
// a gated MLP's has [hidden, gate], n_ffn each.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Layer {
  int kind;  // 0 = sqrll layer, 1 = gated MLP
  int m;     // n_mem or n_ffn
  float eps;
  const float* g;      // (E,) the norm's weight, or null where it is folded into w_in
  const void* w_in;    // (4m or 2m, E)
  const float* b_in;
  const void* w_out;   // (E, m)
  const float* b_out;
};

struct Plan {
  int E, V;
  float eps_f;
  bool bf16;          // matrices are bfloat16 bits (uint16), else float32
  const float* wte;   // (V, E)
  const void* head;   // (V, E)
  const float* g_f;   // (E,) the final norm's weight, or null where it is folded into head
  std::vector<Layer> layers;
  std::vector<float> x, y;  // (B, E), (B, max m)
};

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

inline float widen(float w) { return w; }
inline float widen(uint16_t w) {  // bfloat16 bits -> float32: the high half of the float's bits
  uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// sums of w_k[i] * x[i] for four rows at once: four independent accumulators
template <typename W>
inline void dot4(const W* w0, const W* w1, const W* w2, const W* w3, const float* x, int n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int i = 0; i < n; i++) {
    s0 += widen(w0[i]) * x[i];
    s1 += widen(w1[i]) * x[i];
    s2 += widen(w2[i]) * x[i];
    s3 += widen(w3[i]) * x[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

template <typename W>
inline float dot(const W* w, const float* x, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; i++) s += widen(w[i]) * x[i];
  return s;
}

// xn = x * rsqrt(mean(x^2) + eps) * g for B rows of width E (g null: the weight is in the matrices)
inline void normalize(const float* x, float* xn, int B, int E, float eps, const float* g) {
  for (int b = 0; b < B; b++) {
    const float* xb = x + (int64_t)b * E;
    float rstd = 1.0f / std::sqrt(dot(xb, xb, E) / E + eps);
    for (int i = 0; i < E; i++) xn[(int64_t)b * E + i] = xb[i] * rstd * (g ? g[i] : 1.0f);
  }
}

template <typename W>
void step(Plan& P, int B, float* const* state, float* logits, int n_threads) {
  const int E = P.E, V = P.V;
  float* x = P.x.data();
  float* y = P.y.data();
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<float> xn((size_t)B * E);  // this thread's copy of the normalized input
    int layer = 0;
    for (const Layer& L : P.layers) {
      const int m = L.m;
      const W* w_in = static_cast<const W*>(L.w_in);
      const W* w_out = static_cast<const W*>(L.w_out);
      normalize(x, xn.data(), B, E, L.eps, L.g);
      if (L.kind == 0) {
        float* h = state[layer++];
#pragma omp for schedule(static)
        for (int j = 0; j < m; j++) {
          const W* w = w_in + (int64_t)j * E;
          const int64_t gap = (int64_t)m * E;
          for (int b = 0; b < B; b++) {
            float z[4];
            dot4(w, w + gap, w + 2 * gap, w + 3 * gap, xn.data() + (int64_t)b * E, E, z);
            float r = sigmoid(z[0] + L.b_in[j]);
            float u = (z[1] + L.b_in[m + j]) * sigmoid(z[2] + L.b_in[2 * m + j]);
            float hj = r * h[(int64_t)b * m + j] + u;
            h[(int64_t)b * m + j] = hj;
            y[(int64_t)b * m + j] = hj / (1.0f + std::fabs(hj)) * sigmoid(z[3] + L.b_in[3 * m + j]);
          }
        }
      } else {
#pragma omp for schedule(static)
        for (int j = 0; j < m; j++) {
          const W* w = w_in + (int64_t)j * E;
          for (int b = 0; b < B; b++) {
            const float* xb = xn.data() + (int64_t)b * E;
            float hid = dot(w, xb, E) + L.b_in[j];
            float gate = dot(w + (int64_t)m * E, xb, E) + L.b_in[m + j];
            y[(int64_t)b * m + j] = hid * sigmoid(gate);
          }
        }
      }
#pragma omp for schedule(static)
      for (int o = 0; o < E; o += 4) {
        const W* w = w_out + (int64_t)o * m;
        for (int b = 0; b < B; b++) {
          const float* yb = y + (int64_t)b * m;
          float* xb = x + (int64_t)b * E;
          if (o + 4 <= E) {
            float z[4];
            dot4(w, w + m, w + 2 * m, w + 3 * m, yb, m, z);
            for (int k = 0; k < 4; k++) xb[o + k] += z[k] + L.b_out[o + k];
          } else {
            for (int k = o; k < E; k++) xb[k] += dot(w_out + (int64_t)k * m, yb, m) + L.b_out[k];
          }
        }
      }
    }
    normalize(x, xn.data(), B, E, P.eps_f, P.g_f);
    const W* head = static_cast<const W*>(P.head);
#pragma omp for schedule(static)
    for (int v = 0; v < V; v++)
      for (int b = 0; b < B; b++) logits[(int64_t)b * V + v] = dot(head + (int64_t)v * E, xn.data() + (int64_t)b * E, E);
  }
}

}  // namespace

extern "C" {

// bf16: the matrices (head, w_in, w_out) are bfloat16 bits, else float32; g_f and each layer's g:
// the norm's weight, or null where it is folded into the matrix after it.
void* sq_plan_new(int E, int V, int bf16, const float* wte, const void* head, const float* g_f, float eps_f) {
  return new Plan{E, V, eps_f, bf16 != 0, wte, head, g_f, {}, {}, {}};
}

void sq_plan_add(void* plan, int kind, int m, float eps, const float* g, const void* w_in, const float* b_in,
                 const void* w_out, const float* b_out) {
  static_cast<Plan*>(plan)->layers.push_back(Layer{kind, m, eps, g, w_in, b_in, w_out, b_out});
}

void sq_plan_free(void* plan) { delete static_cast<Plan*>(plan); }

// ids (B,), state: one (B, n_mem) pointer per sqrll layer, updated in place; logits (B, V).
// Returns 0, or -1 if an id is outside the vocabulary (nothing is changed then).
int sq_step(void* plan, int B, const int64_t* ids, float* const* state, float* logits, int n_threads) {
  Plan& P = *static_cast<Plan*>(plan);
  const int E = P.E, V = P.V;
  int max_m = 0;
  for (const Layer& L : P.layers) max_m = L.m > max_m ? L.m : max_m;
  for (int b = 0; b < B; b++)
    if (ids[b] < 0 || ids[b] >= V) return -1;
  P.x.resize((size_t)B * E);
  P.y.resize((size_t)B * max_m);
  for (int b = 0; b < B; b++)
    for (int i = 0; i < E; i++) P.x[(int64_t)b * E + i] = P.wte[ids[b] * E + i];
  if (P.bf16)
    step<uint16_t>(P, B, state, logits, n_threads);
  else
    step<float>(P, B, state, logits, n_threads);
  return 0;
}

}  // extern "C"
