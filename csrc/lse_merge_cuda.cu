// CUDA implementation of the fused LSE merge (see lse_merge.h). Plain CUDA with raw pointers,
// so it compiles with nvcc alone; the torch binding lives in lse_merge.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lse_merge.h"

namespace distseq {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// One thread block per row (b, s, h); its threads stride over head_dim.
template <typename Block>
__global__ void lse_merge_kernel(float* out, float* lse, const Block* block_out,
                                 const float* block_lse, MergeGeometry g) {
  const int64_t row = blockIdx.x;
  const int64_t h = row % g.heads;
  const int64_t s = (row / g.heads) % g.seq;
  const int64_t b = row / (g.heads * g.seq);
  float* lse_ptr = lse + b * g.lse_stride[0] + h * g.lse_stride[1] + s * g.lse_stride[2];
  const float block_value = block_lse[b * g.block_lse_stride[0] + h * g.block_lse_stride[1] +
                                      s * g.block_lse_stride[2]];
  const MergeWeights w = merge_weights(*lse_ptr, block_value);
  float* out_row = out + b * g.out_stride[0] + s * g.out_stride[1] + h * g.out_stride[2];
  const Block* block_row =
      block_out + b * g.block_stride[0] + s * g.block_stride[1] + h * g.block_stride[2];
  for (int64_t d = threadIdx.x; d < g.dim; d += blockDim.x) {
    float* o = out_row + d * g.out_stride[3];
    *o = *o * w.keep + to_float(block_row[d * g.block_stride[3]]) * w.take;
  }
  // Every thread has read the old lse before it is overwritten.
  __syncthreads();
  if (threadIdx.x == 0) {
    *lse_ptr = w.lse;
  }
}

}  // namespace

void lse_merge_cuda(float* out, float* lse, const void* block_out, const float* block_lse,
                    BlockDtype block_dtype, const MergeGeometry& geometry, void* stream) {
  const int64_t rows = geometry.batch * geometry.seq * geometry.heads;
  if (rows == 0) {
    return;
  }
  const int threads = geometry.dim >= 128 ? 128 : (geometry.dim >= 64 ? 64 : 32);
  auto s = static_cast<cudaStream_t>(stream);
  switch (block_dtype) {
    case BlockDtype::kFloat32:
      lse_merge_kernel<<<rows, threads, 0, s>>>(out, lse, static_cast<const float*>(block_out),
                                                block_lse, geometry);
      break;
    case BlockDtype::kFloat16:
      lse_merge_kernel<<<rows, threads, 0, s>>>(out, lse, static_cast<const __half*>(block_out),
                                                block_lse, geometry);
      break;
    case BlockDtype::kBFloat16:
      lse_merge_kernel<<<rows, threads, 0, s>>>(
          out, lse, static_cast<const __nv_bfloat16*>(block_out), block_lse, geometry);
      break;
  }
}

}  // namespace distseq
