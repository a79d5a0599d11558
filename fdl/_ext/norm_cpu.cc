// fdl's batch normalisation (training mode) for the CPU: forward and backward in two passes
// over the activations each, optionally with the ReLU that follows it.
//
// XLA:CPU computes a batch norm's statistics and its backward's two per-channel sums as
// separate reductions (it has no multi-output loop fusion), each a pass over the activations,
// and the elementwise parts as further loops: ~10 passes for forward + backward. Here:
//   forward:  1. per-channel sum and sum of squares (shifted by the first row, accumulated in
//                double, so that a large mean does not cancel the variance away);
//             2. y = x * inv + shift (then max(y, 0) with relu).
//   backward: 1. per-channel sums of g and g * xhat (g = dy, masked by y > 0 with relu);
//             2. dx from dy, x and the per-channel coefficients.
// Shapes: x, y, dy, dx are (rows, channels) row-major (channels last, every other axis folded
// into rows); scale, offset, mean, var and their gradients are (channels,). mean and var are
// the batch's mean and biased variance. float32 throughout, statistics accumulated in double.
// Each pass is split into row blocks run on XLA's intra-op thread pool (ParallelFor): a second
// OpenMP team beside XLA's threads and oneDNN's would oversubscribe the cores.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifndef FDL_BUILD_INFO
#define FDL_BUILD_INFO ""
#endif
extern "C" __attribute__((used)) const char fdl_build_info[] = "FDL_BUILD_INFO{" FDL_BUILD_INFO "}";

namespace {

// Runs fn(0), ..., fn(n - 1) on the calling thread and XLA's intra-op thread pool (the threads
// that run XLA's own loops, so no second team of threads competes with them for the cores).
// Every participant takes the next index from a shared counter, the calling thread included,
// so the work finishes even when no pool thread is free; the caller then waits for the indices
// others took. Pool tasks that start late find no index left and return (they hold the shared
// state, never the caller's stack).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const Fn* fn = nullptr;
    void Work() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        (*fn)(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->n = n;
  shared->fn = &fn;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 4096) {
      __builtin_ia32_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// How many row blocks a pass over rows x c elements is split into (one for small inputs).
int64_t Blocks(ffi::ThreadPool& pool, int64_t rows, int64_t c) {
  if (rows * c < (1 << 15)) return 1;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  return std::min<int64_t>(rows, 4 * threads);
}

// s[c] += x[r, c] - x0[c], ss[c] += (x[r, c] - x0[c])^2 over rows [r0, r1).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void ShiftedSums(const float* x, const float* x0, int64_t r0, int64_t r1, int64_t c,
                 double* s, double* ss) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * c;
#pragma GCC ivdep
    for (int64_t j = 0; j < c; ++j) {
      const double d = static_cast<double>(row[j]) - static_cast<double>(x0[j]);
      s[j] += d;
      ss[j] += d * d;
    }
  }
}

template <bool kRelu>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void Normalize(const float* x, float* y, const float* inv, const float* shift, int64_t r0,
               int64_t r1, int64_t c) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* in = x + r * c;
    float* out = y + r * c;
#pragma GCC ivdep
    for (int64_t j = 0; j < c; ++j) {
      const float v = in[j] * inv[j] + shift[j];
      out[j] = kRelu ? (v > 0.0f ? v : 0.0f) : v;
    }
  }
}

// s1[c] += g, s2[c] += g * (x - mean) (g = dy, or dy where x * inv + shift > 0 with relu).
// ``tmp``: c floats of scratch (the masked row, so that both loops vectorise).
template <bool kRelu>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void GradSums(const float* dy, const float* x, const float* mean, const float* inv,
              const float* shift, int64_t r0, int64_t r1, int64_t c, double* s1, double* s2,
              float* tmp) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g_row = dy + r * c;
    const float* x_row = x + r * c;
    if (kRelu) {
#pragma GCC ivdep
      for (int64_t j = 0; j < c; ++j) {
        tmp[j] = x_row[j] * inv[j] + shift[j] > 0.0f ? g_row[j] : 0.0f;
      }
      g_row = tmp;
    }
#pragma GCC ivdep
    for (int64_t j = 0; j < c; ++j) {
      const double g = g_row[j];
      s1[j] += g;
      s2[j] += g * (static_cast<double>(x_row[j]) - mean[j]);
    }
  }
}

// dx = a * g + k * (x - mean) + b (g as in GradSums).
template <bool kRelu>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void InputGrad(const float* dy, const float* x, float* dx, const float* mean, const float* inv,
               const float* shift, const float* a, const float* k, const float* b, int64_t r0,
               int64_t r1, int64_t c) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g_row = dy + r * c;
    const float* x_row = x + r * c;
    float* out = dx + r * c;
#pragma GCC ivdep
    for (int64_t j = 0; j < c; ++j) {
      float g = g_row[j];
      if (kRelu) g = x_row[j] * inv[j] + shift[j] > 0.0f ? g : 0.0f;
      out[j] = a[j] * g + k[j] * (x_row[j] - mean[j]) + b[j];
    }
  }
}

// The per-channel multiplier and shift of the normalisation: y = x * inv + shift.
void Affine(const float* mean, const float* var, const float* scale, const float* offset,
            float eps, int64_t c, float* rstd, float* inv, float* shift) {
  for (int64_t j = 0; j < c; ++j) {
    rstd[j] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var[j]) + eps));
    inv[j] = rstd[j] * scale[j];
    shift[j] = -mean[j] * inv[j] + offset[j];
  }
}

ffi::Error CheckShapes(const char* name, int64_t rows, int64_t c,
                       std::initializer_list<int64_t> channel_sizes) {
  if (rows < 1 || c < 1) {
    return ffi::Error::InvalidArgument(std::string(name) + ": empty input");
  }
  for (int64_t n : channel_sizes) {
    if (n != c) {
      return ffi::Error::InvalidArgument(std::string(name) + ": per-channel sizes disagree");
    }
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean_out,
                       ffi::ResultBuffer<ffi::F32> var_out, float eps, bool relu) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("fdl_batch_norm_fwd: x must be 2-D");
  const int64_t rows = dims[0], c = dims[1];
  if (auto e = CheckShapes("fdl_batch_norm_fwd", rows, c,
                           {static_cast<int64_t>(scale.element_count()),
                            static_cast<int64_t>(offset.element_count())});
      e.failure()) {
    return e;
  }
  const float* xp = x.typed_data();
  float* mean = mean_out->typed_data();
  float* var = var_out->typed_data();
  const int64_t blocks = Blocks(pool, rows, c);
  std::vector<double> partial(static_cast<size_t>(blocks) * 2 * c, 0.0);
  ParallelFor(pool, blocks, [&](int64_t i) {
    double* s = partial.data() + static_cast<size_t>(i) * 2 * c;
    ShiftedSums(xp, xp, rows * i / blocks, rows * (i + 1) / blocks, c, s, s + c);
  });
  for (int64_t j = 0; j < c; ++j) {
    double sum = 0.0, sumsq = 0.0;
    for (int64_t i = 0; i < blocks; ++i) {
      sum += partial[static_cast<size_t>(i) * 2 * c + j];
      sumsq += partial[static_cast<size_t>(i) * 2 * c + c + j];
    }
    const double d = sum / rows;
    mean[j] = static_cast<float>(xp[j] + d);
    var[j] = static_cast<float>(std::max(sumsq / rows - d * d, 0.0));
  }
  std::vector<float> rstd(c), inv(c), shift(c);
  Affine(mean, var, scale.typed_data(), offset.typed_data(), eps, c, rstd.data(), inv.data(),
         shift.data());
  float* yp = y->typed_data();
  ParallelFor(pool, blocks, [&](int64_t i) {
    (relu ? Normalize<true> : Normalize<false>)(xp, yp, inv.data(), shift.data(),
                                                rows * i / blocks, rows * (i + 1) / blocks, c);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean_in,
                        ffi::Buffer<ffi::F32> var_in, ffi::Buffer<ffi::F32> scale_in,
                        ffi::Buffer<ffi::F32> offset_in, ffi::Buffer<ffi::F32> dmean,
                        ffi::Buffer<ffi::F32> dvar, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> doffset,
                        float eps, bool relu) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || dy.dimensions().size() != 2 || dy.dimensions()[0] != dims[0] ||
      dy.dimensions()[1] != dims[1]) {
    return ffi::Error::InvalidArgument("fdl_batch_norm_bwd: x and dy must be 2-D, one shape");
  }
  const int64_t rows = dims[0], c = dims[1];
  if (auto e = CheckShapes("fdl_batch_norm_bwd", rows, c,
                           {static_cast<int64_t>(mean_in.element_count()),
                            static_cast<int64_t>(var_in.element_count()),
                            static_cast<int64_t>(scale_in.element_count()),
                            static_cast<int64_t>(offset_in.element_count()),
                            static_cast<int64_t>(dmean.element_count()),
                            static_cast<int64_t>(dvar.element_count())});
      e.failure()) {
    return e;
  }
  const float* mean = mean_in.typed_data();
  const float* scale = scale_in.typed_data();
  std::vector<float> rstd(c), inv(c), shift(c), a(c), k(c), b(c);
  Affine(mean, var_in.typed_data(), scale, offset_in.typed_data(), eps, c, rstd.data(),
         inv.data(), shift.data());
  const float* g = dy.typed_data();
  const float* xp = x.typed_data();
  const int64_t blocks = Blocks(pool, rows, c);
  std::vector<double> partial(static_cast<size_t>(blocks) * 2 * c, 0.0);
  ParallelFor(pool, blocks, [&](int64_t i) {
    double* s = partial.data() + static_cast<size_t>(i) * 2 * c;
    std::vector<float> tmp(relu ? c : 0);
    (relu ? GradSums<true> : GradSums<false>)(g, xp, mean, inv.data(), shift.data(),
                                              rows * i / blocks, rows * (i + 1) / blocks, c,
                                              s, s + c, tmp.data());
  });
  const double n = static_cast<double>(rows);
  for (int64_t j = 0; j < c; ++j) {
    double s1 = 0.0, s2 = 0.0;  // sum(g), sum(g * (x - mean))
    for (int64_t i = 0; i < blocks; ++i) {
      s1 += partial[static_cast<size_t>(i) * 2 * c + j];
      s2 += partial[static_cast<size_t>(i) * 2 * c + c + j];
    }
    const double r = rstd[j], aj = static_cast<double>(scale[j]) * r;
    doffset->typed_data()[j] = static_cast<float>(s1);
    dscale->typed_data()[j] = static_cast<float>(s2 * r);  // sum(g * xhat)
    // dx = a g - a s1 / n - a r^2 (x - mean) s2 / n + dmean / n + 2 dvar (x - mean) / n
    a[j] = static_cast<float>(aj);
    k[j] = static_cast<float>((-aj * r * r * s2 + 2.0 * dvar.typed_data()[j]) / n);
    b[j] = static_cast<float>((-aj * s1 + dmean.typed_data()[j]) / n);
  }
  float* dxp = dx->typed_data();
  ParallelFor(pool, blocks, [&](int64_t i) {
    (relu ? InputGrad<true> : InputGrad<false>)(g, xp, dxp, mean, inv.data(), shift.data(),
                                                a.data(), k.data(), b.data(),
                                                rows * i / blocks, rows * (i + 1) / blocks, c);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlBatchNormFwd, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlBatchNormBwd, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("relu"));
