// torch binding of the fused LSE merge: distseq._C.lse_merge_(out, lse, block_out, block_lse).
// CPU kernel here; CUDA tensors go to lse_merge_cuda.cu when the extension was built with CUDA.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "lse_merge.h"

#if defined(DISTSEQ_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace distseq {
namespace {

MergeGeometry geometry_of(const at::Tensor& out, const at::Tensor& lse,
                          const at::Tensor& block_out, const at::Tensor& block_lse) {
  MergeGeometry g{};
  g.batch = out.size(0);
  g.seq = out.size(1);
  g.heads = out.size(2);
  g.dim = out.size(3);
  for (int i = 0; i < 4; ++i) {
    g.out_stride[i] = out.stride(i);
    g.block_stride[i] = block_out.stride(i);
  }
  for (int i = 0; i < 3; ++i) {
    g.lse_stride[i] = lse.stride(i);
    g.block_lse_stride[i] = block_lse.stride(i);
  }
  return g;
}

template <typename Block>
void merge_cpu(float* out, float* lse, const Block* block_out, const float* block_lse,
               const MergeGeometry& g) {
  const int64_t rows = g.batch * g.seq * g.heads;
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % g.heads;
      const int64_t s = (row / g.heads) % g.seq;
      const int64_t b = row / (g.heads * g.seq);
      float* lse_ptr = lse + b * g.lse_stride[0] + h * g.lse_stride[1] + s * g.lse_stride[2];
      const MergeWeights w = merge_weights(
          *lse_ptr, block_lse[b * g.block_lse_stride[0] + h * g.block_lse_stride[1] +
                              s * g.block_lse_stride[2]]);
      float* o = out + b * g.out_stride[0] + s * g.out_stride[1] + h * g.out_stride[2];
      const Block* x =
          block_out + b * g.block_stride[0] + s * g.block_stride[1] + h * g.block_stride[2];
      for (int64_t d = 0; d < g.dim; ++d) {
        float& acc = o[d * g.out_stride[3]];
        acc = acc * w.keep + static_cast<float>(x[d * g.block_stride[3]]) * w.take;
      }
      *lse_ptr = w.lse;
    }
  });
}

void check_inputs(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& block_out,
                  const at::Tensor& block_lse) {
  TORCH_CHECK(out.dim() == 4 && block_out.sizes() == out.sizes(),
              "lse_merge_: out and block_out must both be [B, S, H, D], got ", out.sizes(),
              " and ", block_out.sizes());
  const std::vector<int64_t> lse_shape{out.size(0), out.size(2), out.size(1)};
  TORCH_CHECK(lse.sizes() == lse_shape && block_lse.sizes() == lse_shape,
              "lse_merge_: lse and block_lse must be [B, H, S] = ", lse_shape);
  TORCH_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat &&
                  block_lse.scalar_type() == at::kFloat,
              "lse_merge_: out, lse and block_lse must be float32");
  const auto device = out.device();
  TORCH_CHECK(lse.device() == device && block_out.device() == device &&
                  block_lse.device() == device,
              "lse_merge_: all tensors must be on one device");
}

}  // namespace

void lse_merge_(at::Tensor out, at::Tensor lse, const at::Tensor& block_out,
                const at::Tensor& block_lse) {
  check_inputs(out, lse, block_out, block_lse);
  const MergeGeometry g = geometry_of(out, lse, block_out, block_lse);
  if (out.is_cuda()) {
#if defined(DISTSEQ_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(out.device());
    BlockDtype dtype;
    switch (block_out.scalar_type()) {
      case at::kFloat: dtype = BlockDtype::kFloat32; break;
      case at::kHalf: dtype = BlockDtype::kFloat16; break;
      case at::kBFloat16: dtype = BlockDtype::kBFloat16; break;
      default: TORCH_CHECK(false, "lse_merge_: unsupported block_out dtype ", block_out.scalar_type());
    }
    lse_merge_cuda(out.data_ptr<float>(), lse.data_ptr<float>(), block_out.data_ptr(),
                   block_lse.data_ptr<float>(), dtype, g,
                   c10::cuda::getCurrentCUDAStream().stream());
    return;
#else
    TORCH_CHECK(false, "lse_merge_: distseq._C was built without CUDA");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, block_out.scalar_type(),
                                  "lse_merge_", [&] {
                                    merge_cpu<scalar_t>(out.data_ptr<float>(),
                                                        lse.data_ptr<float>(),
                                                        block_out.data_ptr<scalar_t>(),
                                                        block_lse.data_ptr<float>(), g);
                                  });
}

}  // namespace distseq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lse_merge_", &distseq::lse_merge_,
        "In-place log-sum-exp merge of (block_out, block_lse) into float32 (out, lse)",
        py::arg("out"), py::arg("lse"), py::arg("block_out"), py::arg("block_lse"));
  m.attr("with_cuda") =
#if defined(DISTSEQ_WITH_CUDA)
      true;
#else
      false;
#endif
}
