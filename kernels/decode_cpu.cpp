// One decoding step of a SqrLLM on the CPU, float32, as one call per token: the twin of
// sqrllm.decode.FastStep (same arithmetic, another summation order), built by sqrllm/cpu.py.
//
// A step at batch 1 reads every weight once, so it is bound by memory bandwidth; one core of a
// small machine cannot draw all of it. Each linear layer's output rows are split among OpenMP
// threads, and every thread streams its share of rows. Per block there are two barriers: after
// the input projection (fused with the gates and the recurrence, h = r * h + u) and after the
// output projection (fused with the residual add).
//
// Weights, as sqrllm.decode.NativeStep lays them out: each matrix (out, in) row-major, the
// preceding RMSNorm's weight folded into its columns; biases (out,), zeros where the model has none.
// A sqrll layer's input projection has rows [forget, input, input gate, output gate], n_mem each;
// a gated MLP's has [hidden, gate], n_ffn each.

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Layer {
  int kind;  // 0 = sqrll layer, 1 = gated MLP
  int m;     // n_mem or n_ffn
  float eps;
  const float* w_in;   // (4m or 2m, E)
  const float* b_in;
  const float* w_out;  // (E, m)
  const float* b_out;
};

struct Plan {
  int E, V;
  float eps_f;
  const float* wte;   // (V, E)
  const float* head;  // (V, E), final norm folded
  std::vector<Layer> layers;
  std::vector<float> x, y;  // (B, E), (B, max m)
};

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// sums of w_k[i] * x[i] for four rows at once: four independent accumulators
inline void dot4(const float* w0, const float* w1, const float* w2, const float* w3, const float* x, int n,
                 float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int i = 0; i < n; i++) {
    s0 += w0[i] * x[i];
    s1 += w1[i] * x[i];
    s2 += w2[i] * x[i];
    s3 += w3[i] * x[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

inline float dot(const float* w, const float* x, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; i++) s += w[i] * x[i];
  return s;
}

// xn = x * rsqrt(mean(x^2) + eps) for B rows of width E (the norm's weight is in the matrices)
inline void normalize(const float* x, float* xn, int B, int E, float eps) {
  for (int b = 0; b < B; b++) {
    const float* xb = x + (int64_t)b * E;
    float rstd = 1.0f / std::sqrt(dot(xb, xb, E) / E + eps);
    for (int i = 0; i < E; i++) xn[(int64_t)b * E + i] = xb[i] * rstd;
  }
}

}  // namespace

extern "C" {

void* sq_plan_new(int E, int V, const float* wte, const float* head, float eps_f) {
  return new Plan{E, V, eps_f, wte, head, {}, {}, {}};
}

void sq_plan_add(void* plan, int kind, int m, float eps, const float* w_in, const float* b_in, const float* w_out,
                 const float* b_out) {
  static_cast<Plan*>(plan)->layers.push_back(Layer{kind, m, eps, w_in, b_in, w_out, b_out});
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
  float* x = P.x.data();
  float* y = P.y.data();
  for (int b = 0; b < B; b++)
    for (int i = 0; i < E; i++) x[(int64_t)b * E + i] = P.wte[ids[b] * E + i];

#pragma omp parallel num_threads(n_threads)
  {
    std::vector<float> xn((size_t)B * E);  // this thread's copy of the normalized input
    int layer = 0;
    for (const Layer& L : P.layers) {
      const int m = L.m;
      normalize(x, xn.data(), B, E, L.eps);
      if (L.kind == 0) {
        float* h = state[layer++];
#pragma omp for schedule(static)
        for (int j = 0; j < m; j++) {
          const float* w = L.w_in + (int64_t)j * E;
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
          const float* w = L.w_in + (int64_t)j * E;
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
        const float* w = L.w_out + (int64_t)o * m;
        for (int b = 0; b < B; b++) {
          const float* yb = y + (int64_t)b * m;
          float* xb = x + (int64_t)b * E;
          if (o + 4 <= E) {
            float z[4];
            dot4(w, w + m, w + 2 * m, w + 3 * m, yb, m, z);
            for (int k = 0; k < 4; k++) xb[o + k] += z[k] + L.b_out[o + k];
          } else {
            for (int k = o; k < E; k++) xb[k] += dot(L.w_out + (int64_t)k * m, yb, m) + L.b_out[k];
          }
        }
      }
    }
    normalize(x, xn.data(), B, E, P.eps_f);
#pragma omp for schedule(static)
    for (int v = 0; v < V; v++)
      for (int b = 0; b < B; b++) logits[(int64_t)b * V + v] = dot(P.head + (int64_t)v * E, xn.data() + (int64_t)b * E, E);
  }
  return 0;
}

}  // extern "C"
