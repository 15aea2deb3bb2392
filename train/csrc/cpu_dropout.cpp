// CPU training kernels for train/cpu_dropout.py: attention with dropout, fused (softmax(Q K^T * scaling + mask),
// dropout, @ V), and plain dropout with masks drawn in parallel.
//
// Why attention: PyTorch's fused CPU attention (flash) refuses dropout, and its fallback materialises the whole
// (batch, heads, L, L) probabilities several times; in Python, blocks of sequences still pay a pass over memory
// per elementwise step. Here one thread takes one (batch, head) at a time and a block of query rows stays in
// cache through scores, softmax, dropout and both matrix products. Nothing of size L x L outlives a call:
// backward recomputes the probabilities from Q, K and each row's log-sum-exp, and regenerates the dropout mask
// from a counter-based generator (SplitMix64 keyed by one 64-bit seed per call that Python draws from torch's
// CPU generator, so torch.manual_seed and checkpointed RNG state cover it).
//
// Why dropout: torch's CPU generator draws serially (one Mersenne-Twister stream); here the threads draw their own
// parts of the stream, and mask, scale and multiply are one pass.
//
// Masks have train/cpu_dropout.py's drop probability: a 64-bit word gives four 16-bit lanes (low lane first), a
// lane drops when its value is < threshold = round(p * 65536); kept values are scaled by `scale`.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// Fortran BLAS, exported by torch's CPU library (MKL on x86 builds).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Row-major C (M x N) = alpha * op(A) (M x K) @ op(B) (K x N) + beta * C. BLAS is column-major, so this asks
// for C^T = op(B)^T @ op(A)^T, which has the same memory layout.
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &N, &M, &K, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

inline uint64_t splitmix64(uint64_t seed, uint64_t word) {
  uint64_t z = seed + (word + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// keep[j] = 1 unless element `first + j` of the stream drops (its 16-bit lane < threshold). The aligned middle
// goes through a small buffer of words so that both loops vectorize (the words, then their 16-bit lanes): 2.2x
// the word-at-a-time loop with AVX2, and an AVX-512 clone (picked at load time where the CPU has it) 2.5x more.
__attribute__((target_clones("arch=x86-64-v4", "default")))
void keep_row(uint8_t* keep, uint64_t seed, uint64_t first, int64_t n, uint32_t threshold) {
  const auto one = [&](int64_t j) {
    const uint64_t idx = first + j;
    keep[j] = ((splitmix64(seed, idx >> 2) >> (16 * (idx & 3))) & 0xffff) >= threshold;
  };
  int64_t j = 0;
  for (; j < n && ((first + j) & 3); ++j) one(j);
  constexpr int64_t kWords = 64;
  uint64_t words[kWords];
  while (j + 4 * kWords <= n) {
    const uint64_t word0 = (first + j) >> 2;
    for (int64_t w = 0; w < kWords; ++w) words[w] = splitmix64(seed, word0 + w);
    const uint16_t* lanes = reinterpret_cast<const uint16_t*>(words);  // little-endian: low lane first
    for (int64_t l = 0; l < 4 * kWords; ++l) keep[j + l] = lanes[l] >= threshold;
    j += 4 * kWords;
  }
  for (; j < n; ++j) one(j);
}

// exp(x), 0 below -87 (exp underflows to denormals there). Why: masked scores sit near -3.4e38, and the
// vectorized expf falls back to a scalar call for every lane out of its range (2x slower on padded batches).
inline float safe_exp(float x) {
  const float e = std::exp(std::max(x, -87.f));
  return x < -87.f ? 0.f : e;
}

// A (batch, heads, rows, cols) view by raw pointer and strides; the last dimension is contiguous.
struct View4 {
  const float* data;
  int64_t s0, s1, s2;
  View4(const torch::Tensor& t) : data(t.data_ptr<float>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const float* at(int64_t b, int64_t h) const { return data + b * s0 + h * s1; }
};

struct Shape {
  int64_t batch, heads, q_len, k_len, dim, rows_per_block;
};

Shape shape_of(const torch::Tensor& q, const torch::Tensor& k, int64_t rows_per_block) {
  TORCH_CHECK(rows_per_block > 0, "fused dropout attention: rows_per_block must be positive");
  return Shape{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), std::min(rows_per_block, q.size(2))};
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const c10::optional<torch::Tensor>& mask) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->dim() == 4 && t->stride(3) == 1,
                "fused dropout attention: expects fp32 CPU (batch, heads, length, head_dim) tensors with a "
                "contiguous last dimension");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "fused dropout attention: query, key and value shapes do not match");
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == torch::kFloat32 && mask->dim() == 4 && mask->size(0) == q.size(0) &&
                    mask->size(1) == q.size(1) && mask->size(2) == q.size(2) && mask->size(3) == k.size(2) &&
                    mask->stride(3) == 1,
                "fused dropout attention: the mask must be an fp32 additive mask expanded to (batch, heads, "
                "q_len, k_len) with a contiguous last dimension");
  }
}

// scores[i, :] = scaling * q_i . K + mask row, for `rows` query rows starting at r0.
void block_scores(float* scores, const Shape& s, const float* q, int64_t q_ld, const float* k, int64_t k_ld,
                  const float* mask, int64_t mask_ld, int64_t r0, int64_t rows, float scaling) {
  gemm(false, true, rows, s.k_len, s.dim, scaling, q + r0 * q_ld, q_ld, k, k_ld, 0.f, scores, s.k_len);
  if (mask) {
    for (int64_t i = 0; i < rows; ++i) {
      float* row = scores + i * s.k_len;
      const float* m = mask + (r0 + i) * mask_ld;
      for (int64_t j = 0; j < s.k_len; ++j) row[j] += m[j];
    }
  }
}

}  // namespace

// Returns (out laid out as (batch, q_len, heads, head_dim), row log-sum-exp (batch, heads, q_len)).
std::vector<torch::Tensor> forward(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                                   const c10::optional<torch::Tensor>& mask, int64_t seed, int64_t threshold,
                                   double scale, double scaling, int64_t rows_per_block) {
  check_inputs(query, key, value, mask);
  const Shape s = shape_of(query, key, rows_per_block);
  auto out = torch::empty({s.batch, s.q_len, s.heads, s.dim}, query.options());
  auto lse = torch::empty({s.batch, s.heads, s.q_len}, query.options());
  const View4 Q(query), K(key), V(value);
  float* out_data = out.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();
  const float* mask_data = mask ? mask->data_ptr<float>() : nullptr;
  const int64_t m0 = mask ? mask->stride(0) : 0, m1 = mask ? mask->stride(1) : 0, m2 = mask ? mask->stride(2) : 0;
  const int64_t out_ld = s.heads * s.dim;
  const uint64_t key64 = static_cast<uint64_t>(seed);
  const uint32_t t = static_cast<uint32_t>(threshold);

  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(s.rows_per_block * s.k_len);
    std::vector<uint8_t> keep(s.k_len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.heads, h = bh % s.heads;
      const float* mrow = mask_data ? mask_data + b * m0 + h * m1 : nullptr;
      float* o = out_data + b * s.q_len * out_ld + h * s.dim;
      for (int64_t r0 = 0; r0 < s.q_len; r0 += s.rows_per_block) {
        const int64_t rows = std::min(s.rows_per_block, s.q_len - r0);
        block_scores(scores.data(), s, Q.at(b, h), Q.s2, K.at(b, h), K.s2, mrow, m2, r0, rows, scaling);
        for (int64_t i = 0; i < rows; ++i) {
          float* row = scores.data() + i * s.k_len;
          float mx = row[0];
          for (int64_t j = 1; j < s.k_len; ++j) mx = std::max(mx, row[j]);
          float sum = 0.f;
          for (int64_t j = 0; j < s.k_len; ++j) {
            row[j] = safe_exp(row[j] - mx);
            sum += row[j];
          }
          lse_data[bh * s.q_len + r0 + i] = mx + std::log(sum);
          keep_row(keep.data(), key64, static_cast<uint64_t>((bh * s.q_len + r0 + i) * s.k_len), s.k_len, t);
          const float inv = 1.f / sum;
          for (int64_t j = 0; j < s.k_len; ++j) row[j] *= inv * static_cast<float>(keep[j]);
        }
        gemm(false, false, rows, s.dim, s.k_len, static_cast<float>(scale), scores.data(), s.k_len, V.at(b, h), V.s2,
             0.f, o + r0 * out_ld, out_ld);
      }
    }
  });
  return {out, lse};
}

// Gradients (query, key, value) of forward's output; grad_out is (batch, q_len, heads, head_dim).
std::vector<torch::Tensor> backward(const torch::Tensor& grad_out, const torch::Tensor& query, const torch::Tensor& key,
                                    const torch::Tensor& value, const c10::optional<torch::Tensor>& mask,
                                    const torch::Tensor& lse, int64_t seed, int64_t threshold, double scale,
                                    double scaling, int64_t rows_per_block) {
  check_inputs(query, key, value, mask);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.stride(3) == 1 && grad_out.scalar_type() == torch::kFloat32,
              "fused dropout attention: bad gradient layout");
  const Shape s = shape_of(query, key, rows_per_block);
  auto grad_q = torch::empty_like(query), grad_k = torch::empty_like(key), grad_v = torch::empty_like(value);
  const View4 Q(query), K(key), V(value);
  // grad_out (batch, q_len, heads, dim) seen as (batch, heads, q_len, dim)
  const float* go = grad_out.data_ptr<float>();
  const int64_t g0 = grad_out.stride(0), g1 = grad_out.stride(2), g2 = grad_out.stride(1);
  const float* lse_data = lse.data_ptr<float>();
  const float* mask_data = mask ? mask->data_ptr<float>() : nullptr;
  const int64_t m0 = mask ? mask->stride(0) : 0, m1 = mask ? mask->stride(1) : 0, m2 = mask ? mask->stride(2) : 0;
  float *dq = grad_q.data_ptr<float>(), *dk = grad_k.data_ptr<float>(), *dv = grad_v.data_ptr<float>();
  const int64_t dq0 = grad_q.stride(0), dq1 = grad_q.stride(1), dq2 = grad_q.stride(2);
  const int64_t dk0 = grad_k.stride(0), dk1 = grad_k.stride(1), dk2 = grad_k.stride(2);
  const int64_t dv0 = grad_v.stride(0), dv1 = grad_v.stride(1), dv2 = grad_v.stride(2);
  const uint64_t key64 = static_cast<uint64_t>(seed);
  const uint32_t t = static_cast<uint32_t>(threshold);

  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(s.rows_per_block * s.k_len), grads(s.rows_per_block * s.k_len);
    std::vector<uint8_t> keep(s.k_len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.heads, h = bh % s.heads;
      const float* mrow = mask_data ? mask_data + b * m0 + h * m1 : nullptr;
      const float* g = go + b * g0 + h * g1;
      float* dq_bh = dq + b * dq0 + h * dq1;
      float* dk_bh = dk + b * dk0 + h * dk1;
      float* dv_bh = dv + b * dv0 + h * dv1;
      for (int64_t r0 = 0; r0 < s.q_len; r0 += s.rows_per_block) {
        const int64_t rows = std::min(s.rows_per_block, s.q_len - r0);
        const float accumulate = r0 == 0 ? 0.f : 1.f;  // dK and dV sum over query blocks
        block_scores(probs.data(), s, Q.at(b, h), Q.s2, K.at(b, h), K.s2, mrow, m2, r0, rows, scaling);
        // grads = scale * dO V^T: the gradient of the kept, scaled probabilities
        gemm(false, true, rows, s.k_len, s.dim, static_cast<float>(scale), g + r0 * g2, g2, V.at(b, h), V.s2, 0.f,
             grads.data(), s.k_len);
        for (int64_t i = 0; i < rows; ++i) {
          float* p = probs.data() + i * s.k_len;
          float* d = grads.data() + i * s.k_len;
          const float row_lse = lse_data[bh * s.q_len + r0 + i];
          keep_row(keep.data(), key64, static_cast<uint64_t>((bh * s.q_len + r0 + i) * s.k_len), s.k_len, t);
          float dot = 0.f;
          for (int64_t j = 0; j < s.k_len; ++j) {
            p[j] = safe_exp(p[j] - row_lse);
            d[j] *= static_cast<float>(keep[j]);
            dot += p[j] * d[j];
          }
          for (int64_t j = 0; j < s.k_len; ++j) {
            d[j] = p[j] * (d[j] - dot);                 // softmax backward: gradient of the scores
            p[j] *= static_cast<float>(keep[j]);        // the dropped probabilities, for dV
          }
        }
        gemm(true, false, s.k_len, s.dim, rows, static_cast<float>(scale), probs.data(), s.k_len, g + r0 * g2, g2,
             accumulate, dv_bh, dv2);
        gemm(false, false, rows, s.dim, s.k_len, static_cast<float>(scaling), grads.data(), s.k_len, K.at(b, h), K.s2,
             0.f, dq_bh + r0 * dq2, dq2);
        gemm(true, false, s.k_len, s.dim, rows, static_cast<float>(scaling), grads.data(), s.k_len,
             Q.at(b, h) + r0 * Q.s2, Q.s2, accumulate, dk_bh, dk2);
      }
    }
  });
  return {grad_q, grad_k, grad_v};
}

// Dropout of a contiguous fp32 tensor: (x * keep * scale, keep), keep[i] from element i of the stream for `seed`.
std::vector<torch::Tensor> dropout(const torch::Tensor& x, int64_t seed, int64_t threshold, double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "dropout kernel: expects a contiguous fp32 CPU tensor");
  auto out = torch::empty_like(x);
  auto keep = torch::empty(x.sizes(), x.options().dtype(torch::kUInt8));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint8_t* k = keep.data_ptr<uint8_t>();
  const int64_t n = x.numel();
  const float s = static_cast<float>(scale);
  constexpr int64_t chunk = 1024;  // a multiple of 4: chunks start on a 64-bit word of the stream
  at::parallel_for(0, (n + chunk - 1) / chunk, 16, [&](int64_t c0, int64_t c1) {
    const int64_t begin = c0 * chunk, end = std::min(n, c1 * chunk);
    keep_row(k + begin, static_cast<uint64_t>(seed), static_cast<uint64_t>(begin), end - begin,
             static_cast<uint32_t>(threshold));
    for (int64_t i = begin; i < end; ++i) dst[i] = src[i] * (s * static_cast<float>(k[i]));
  });
  return {out, keep};
}

// grad * keep * scale: dropout's backward, one pass.
torch::Tensor dropout_backward(const torch::Tensor& grad, const torch::Tensor& keep, double scale) {
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() && keep.is_contiguous() &&
                  grad.numel() == keep.numel(),
              "dropout kernel: bad gradient or mask");
  auto out = torch::empty_like(grad);
  const float* g = grad.data_ptr<float>();
  const uint8_t* k = keep.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, grad.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = g[i] * (s * static_cast<float>(k[i]));
  });
  return out;
}

// The uint8 keep mask (batch, heads, q_len, k_len) that forward and backward use for `seed`: for tests.
torch::Tensor keep_mask(int64_t batch, int64_t heads, int64_t q_len, int64_t k_len, int64_t seed, int64_t threshold) {
  auto keep = torch::empty({batch, heads, q_len, k_len}, torch::kUInt8);
  uint8_t* data = keep.data_ptr<uint8_t>();
  for (int64_t r = 0; r < batch * heads * q_len; ++r) {
    keep_row(data + r * k_len, static_cast<uint64_t>(seed), static_cast<uint64_t>(r * k_len), k_len,
             static_cast<uint32_t>(threshold));
  }
  return keep;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused attention with dropout, forward");
  m.def("backward", &backward, "fused attention with dropout, backward");
  m.def("dropout", &dropout, "dropout with masks from the stream, drawn in parallel");
  m.def("dropout_backward", &dropout_backward, "dropout backward");
  m.def("keep_mask", &keep_mask, "the keep mask the attention kernel draws for a seed");
}
