// fdl: float32 matrix products as XLA FFI handlers on oneDNN: dense layers' C = op(A) @ op(B)
// (op: identity or transpose; oneDNN's sgemm) and attention's per-(batch, head) products on
// head-split (B, T, heads, D) arrays (oneDNN's batched matmul on strided views: no transposes).
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

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "oneapi/dnnl/dnnl.hpp"
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

// ---------------------------------------------------------------------------- heads products
//
// kind 0 (scores):      a (B, T1, H, D), b (B, T2, H, D) -> (B, H, T1, T2) = a_bh b_bh^T
// kind 1 (apply):       a (B, H, T1, T2), b (B, T2, H, D) -> (B, T1, H, D) = a_bh b_bh
// kind 2 (apply^T):     a (B, H, T1, T2), b (B, T1, H, D) -> (B, T2, H, D) = a_bh^T b_bh
// (x_bh: the (T, D) matrix of batch b, head h, rows H*D apart). One oneDNN matmul over the
// batch dims (B, H) on strided memory descriptors; primitives cached per shape.

using dnnl::memory;
using Dims = memory::dims;

struct HeadsEntry {
  dnnl::matmul prim;
  memory::desc src, wei, dst;
};

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

std::shared_ptr<HeadsEntry> heads_entry(int64_t kind, int64_t b, int64_t h, int64_t t1,
                                        int64_t t2, int64_t d) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 6>, std::shared_ptr<HeadsEntry>> cache;
  std::array<int64_t, 6> key{kind, b, h, t1, t2, d};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const auto f32 = memory::data_type::f32;
  auto strided = [&](int64_t t) { return Dims{t * h * d, d, h * d, 1}; };  // (B,H,T,D) view
  auto dense = [&](int64_t r, int64_t c) { return Dims{h * r * c, r * c, c, 1}; };
  auto e = std::make_shared<HeadsEntry>();
  if (kind == 0) {
    e->src = memory::desc({b, h, t1, d}, f32, strided(t1));
    e->wei = memory::desc({b, h, d, t2}, f32, Dims{t2 * h * d, d, 1, h * d});
    e->dst = memory::desc({b, h, t1, t2}, f32, dense(t1, t2));
  } else if (kind == 1) {
    e->src = memory::desc({b, h, t1, t2}, f32, dense(t1, t2));
    e->wei = memory::desc({b, h, t2, d}, f32, strided(t2));
    e->dst = memory::desc({b, h, t1, d}, f32, strided(t1));
  } else {
    e->src = memory::desc({b, h, t2, t1}, f32, Dims{h * t1 * t2, t1 * t2, 1, t2});
    e->wei = memory::desc({b, h, t1, d}, f32, strided(t1));
    e->dst = memory::desc({b, h, t2, d}, f32, strided(t2));
  }
  e->prim = dnnl::matmul(dnnl::matmul::primitive_desc(engine(), e->src, e->wei, e->dst));
  cache[key] = e;
  return e;
}

ffi::Error HeadsImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                     ffi::ResultBuffer<ffi::F32> c, int64_t kind) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto cd = c->dimensions();
  if (ad.size() != 4 || bd.size() != 4 || cd.size() != 4 || kind < 0 || kind > 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl heads matmul: bad operands");
  }
  // (B, H, T1, T2, D) from the operands, per kind
  int64_t nb = ad[0], nh, t1, t2, d;
  if (kind == 0) {
    nh = ad[2]; t1 = ad[1]; t2 = bd[1]; d = ad[3];
  } else {
    nh = ad[1]; t1 = ad[2]; t2 = ad[3]; d = bd[3];
  }
  if (nb == 0 || nh == 0 || t1 == 0 || t2 == 0 || d == 0) {
    const int64_t n = cd[0] * cd[1] * cd[2] * cd[3];
    for (int64_t i = 0; i < n; ++i) c->typed_data()[i] = 0.f;
    return ffi::Error::Success();
  }
  try {
    auto e = heads_entry(kind, nb, nh, t1, t2, d);
    auto& eng = engine();
    memory src(e->src, eng, const_cast<float*>(a.typed_data()));
    memory wei(e->wei, eng, const_cast<float*>(b.typed_data()));
    memory dst(e->dst, eng, c->typed_data());
    std::lock_guard<std::mutex> lock(gemm_mutex());
    dnnl::stream strm(eng);
    e->prim.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    strm.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("fdl heads matmul (oneDNN): ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlHeadsMatmul, HeadsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb"));

extern "C" int fdl_dense_onednn_abi_version() { return 1; }
