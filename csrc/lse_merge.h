// Fused log-sum-exp merge of a partial attention result into float32 accumulators.
//
// For every row (b, s, h) with lse = L, block lse = Lb and new = logaddexp(L, Lb):
//   out[b, s, h, :] = out * exp(L - new) + block_out * exp(Lb - new),   lse = new.
// A row that is -inf on both sides (it saw no key yet) becomes out = 0, lse = -inf.
// Tensors are addressed through explicit strides, so the accumulators may be views
// (e.g. a zigzag half of the local shard).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DISTSEQ_HD __host__ __device__ __forceinline__
#else
#define DISTSEQ_HD inline
#endif

namespace distseq {

// Shape and strides (in elements) of the four tensors; out/block_out are [B, S, H, D] and
// lse/block_lse are [B, H, S].
struct MergeGeometry {
  int64_t batch, seq, heads, dim;
  int64_t out_stride[4];
  int64_t block_stride[4];
  int64_t lse_stride[3];
  int64_t block_lse_stride[3];
};

// The two weights of a merge; both 0 when neither side has seen a key.
struct MergeWeights {
  float keep, take, lse;
};

DISTSEQ_HD MergeWeights merge_weights(float lse, float block_lse) {
  const float hi = lse > block_lse ? lse : block_lse;
  if (hi == -INFINITY) {
    return {0.0f, 0.0f, -INFINITY};
  }
  const float lo = lse > block_lse ? block_lse : lse;
  const float merged = hi + log1pf(expf(lo - hi));
  return {expf(lse - merged), expf(block_lse - merged), merged};
}

enum class BlockDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#if defined(DISTSEQ_WITH_CUDA)
// Launches the CUDA kernel on the current stream (defined in lse_merge_cuda.cu).
void lse_merge_cuda(float* out, float* lse, const void* block_out, const float* block_lse,
                    BlockDtype block_dtype, const MergeGeometry& geometry, void* stream);
#endif

}  // namespace distseq
