// fdl: the float32 matrix product C = op(A) @ op(B) (op: identity or transpose) as an XLA FFI
// handler on oneDNN's sgemm.
//
// Row-major operands: A is (M, K), or (K, M) when ta; B is (K, N), or (N, K) when tb; C is
// (M, N). fdl/nn/matmul.py calls it for dense layers (forward: ta = tb = 0; input gradient:
// tb = 1; weight gradient: ta = 1), on 2-D buffers only (its batching rule folds or maps
// leading axes before the call).
//
// Threads: dnnl_sgemm runs an OpenMP team of the calling thread's size (every core by default).
// XLA's thunk executor may run independent custom calls concurrently (a layer's input and
// weight gradients); two full-size teams would spin against each other on the same cores, so
// a process-wide mutex runs one product at a time (as fdl's convolution does).

#include <cstdint>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The build record fdl/_ext/build.py writes and fdl/_ext/loader.py checks before loading.
#ifndef FDL_BUILD_INFO
#define FDL_BUILD_INFO ""
#endif
extern "C" __attribute__((used)) const char fdl_build_info[] = "FDL_BUILD_INFO{" FDL_BUILD_INFO "}";

namespace {

std::mutex& gemm_mutex() {
  static std::mutex m;
  return m;
}

ffi::Error MatmulImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, int64_t ta, int64_t tb) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl matmul: operands must be 2-D");
  }
  const int64_t m = ta ? ad[1] : ad[0];
  const int64_t k = ta ? ad[0] : ad[1];
  const int64_t kb = tb ? bd[1] : bd[0];
  const int64_t n = tb ? bd[0] : bd[1];
  if (k != kb || cd[0] != m || cd[1] != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fdl matmul: shapes do not match: A " + std::to_string(ad[0]) + "x" +
                          std::to_string(ad[1]) + ", B " + std::to_string(bd[0]) + "x" +
                          std::to_string(bd[1]) + ", C " + std::to_string(cd[0]) + "x" +
                          std::to_string(cd[1]));
  }
  float* out = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    for (int64_t i = 0; i < m * n; ++i) out[i] = 0.f;
    return ffi::Error::Success();
  }
  std::lock_guard<std::mutex> lock(gemm_mutex());
  const dnnl_status_t st =
      dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.f, a.typed_data(), ad[1],
                 b.typed_data(), bd[1], 0.f, out, n);
  if (st != dnnl_success) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "fdl matmul: dnnl_sgemm failed with status " + std::to_string(int(st)));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb"));

extern "C" int fdl_dense_onednn_abi_version() { return 1; }
