// fdl's fused optimizer steps for the CPU: Adam/AdamW and SGD (heavy-ball or Nesterov
// momentum) over every parameter leaf in one XLA FFI call.
//
// XLA:CPU does not fuse sibling elementwise loops that produce several outputs, so Adam's
// step as a chain of JAX operations runs three loops per leaf (the first moment, the second
// moment, then the parameter from both), reading the gradient twice and the new moments once
// more: 7 reads and 3 writes per element. Here each element is read once and written once
// (params, grads, moments in; params, moments out, in place when the caller donates them):
// 4 reads and 3 writes. The arithmetic is fdl.optim's, operation by operation (PyTorch's
// order), in float32; constants such as 1 - b1 come rounded to float32 from Python, as JAX
// rounds a Python float's arithmetic.
//
// Operands: ``scalars`` (f32[3]: learning rate, 1 / (1 - b1^t), 1 / sqrt(1 - b2^t)), then the
// leaves as groups of n buffers: params, grads, then one group per state tree. Results: params,
// then the state trees. Every buffer is float32; the leaves of one index have one size.

#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifndef FDL_BUILD_INFO
#define FDL_BUILD_INFO ""
#endif
extern "C" __attribute__((used)) const char fdl_build_info[] = "FDL_BUILD_INFO{" FDL_BUILD_INFO "}";

// From libgomp (this library is compiled with -fopenmp).
extern "C" int omp_get_max_threads(void);
extern "C" int omp_get_thread_num(void);
extern "C" int omp_get_num_threads(void);

namespace {

struct AdamHyper {
  float one_minus_b1, b2, one_minus_b2, eps, wd, neg_lr, inv_bc1, inv_sqrt_bc2;
  bool decoupled;  // AdamW: wd * p added after the scaling; else (Adam) to the gradient
};

struct MomentumHyper {
  float mu, wd, neg_lr;
  bool nesterov;
};

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void AdamRange(const float* p, const float* g, const float* m, const float* v, float* p_out,
               float* m_out, float* v_out, int64_t n, AdamHyper h) {
  // Results may be their operands (in place): element i is read before it is written and no
  // element depends on another, so the loop vectorises without runtime overlap checks.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    const float pi = p[i];
    if (!h.decoupled && h.wd != 0.0f) gi = gi + h.wd * pi;
    const float mi = m[i] + h.one_minus_b1 * (gi - m[i]);
    const float vi = h.b2 * v[i] + h.one_minus_b2 * (gi * gi);
    float u = (mi * h.inv_bc1) / (std::sqrt(vi) * h.inv_sqrt_bc2 + h.eps);
    if (h.decoupled && h.wd != 0.0f) u = u + h.wd * pi;
    m_out[i] = mi;
    v_out[i] = vi;
    p_out[i] = pi + u * h.neg_lr;
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void MomentumRange(const float* p, const float* g, const float* b, float* p_out, float* b_out,
                   int64_t n, MomentumHyper h) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    const float gi = h.wd != 0.0f ? g[i] + h.wd * pi : g[i];
    const float bi = h.mu * b[i] + gi;
    const float u = h.nesterov ? gi + h.mu * bi : bi;
    b_out[i] = bi;
    p_out[i] = pi + u * h.neg_lr;
  }
}

// The leaves as raw pointers: ins[k][i] is operand group k's leaf i, outs[k][i] result group k's.
struct Leaves {
  std::vector<std::vector<const float*>> ins;
  std::vector<std::vector<float*>> outs;
  std::vector<int64_t> sizes;
};

ffi::Error Collect(ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t n_in_groups,
                   int64_t n_out_groups, Leaves* leaves) {
  if (args.size() % n_in_groups != 0 || rets.size() * n_in_groups !=
      args.size() * n_out_groups) {
    return ffi::Error::InvalidArgument("fdl optimizer step: operand/result counts disagree");
  }
  const size_t n = args.size() / n_in_groups;
  leaves->ins.assign(n_in_groups, std::vector<const float*>(n));
  leaves->outs.assign(n_out_groups, std::vector<float*>(n));
  leaves->sizes.assign(n, 0);
  for (int64_t k = 0; k < n_in_groups; ++k) {
    for (size_t i = 0; i < n; ++i) {
      auto buf = args.get<ffi::AnyBuffer>(k * n + i);
      if (buf.has_error()) return buf.error();
      if (buf->element_type() != ffi::DataType::F32) {
        return ffi::Error::InvalidArgument("fdl optimizer step: leaves must be float32");
      }
      const int64_t size = static_cast<int64_t>(buf->element_count());
      if (k == 0) leaves->sizes[i] = size;
      if (size != leaves->sizes[i]) {
        return ffi::Error::InvalidArgument("fdl optimizer step: leaf sizes disagree");
      }
      leaves->ins[k][i] = static_cast<const float*>(buf->untyped_data());
    }
  }
  for (int64_t k = 0; k < n_out_groups; ++k) {
    for (size_t i = 0; i < n; ++i) {
      auto buf = rets.get<ffi::AnyBuffer>(k * n + i);
      if (buf.has_error()) return buf.error();
      if ((*buf)->element_count() != static_cast<size_t>(leaves->sizes[i])) {
        return ffi::Error::InvalidArgument("fdl optimizer step: result sizes disagree");
      }
      leaves->outs[k][i] = static_cast<float*>((*buf)->untyped_data());
    }
  }
  return ffi::Error::Success();
}

// Runs body(leaf, begin, count) over all elements of all leaves, split into equal contiguous
// shares of the concatenated leaves, one per OpenMP thread (one thread for small totals).
template <typename Body>
void ParallelOverLeaves(const std::vector<int64_t>& sizes, Body body) {
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  const int threads = total < (1 << 16) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    // shares rounded to 16 floats (64 bytes), so two threads never write one cache line
    int64_t begin = (total * t / nt) & ~int64_t{15};
    const int64_t end = t + 1 == nt ? total : (total * (t + 1) / nt) & ~int64_t{15};
    int64_t offset = 0;
    for (size_t i = 0; i < sizes.size() && begin < end; ++i) {
      const int64_t lo = offset, hi = offset + sizes[i];
      offset = hi;
      if (hi <= begin) continue;
      const int64_t stop = end < hi ? end : hi;
      body(i, begin - lo, stop - begin);
      begin = stop;
    }
  }
}

ffi::Error AdamImpl(ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                    ffi::RemainingRets rets, float one_minus_b1, float b2, float one_minus_b2,
                    float eps, float weight_decay, bool decoupled) {
  if (scalars.element_count() != 3) {
    return ffi::Error::InvalidArgument("fdl_adam_step: scalars must be f32[3]");
  }
  Leaves l;
  if (auto e = Collect(args, rets, 4, 3, &l); e.failure()) return e;
  const float* s = scalars.typed_data();
  AdamHyper h{one_minus_b1, b2, one_minus_b2, eps, weight_decay, -s[0], s[1], s[2], decoupled};
  ParallelOverLeaves(l.sizes, [&](size_t i, int64_t at, int64_t n) {
    AdamRange(l.ins[0][i] + at, l.ins[1][i] + at, l.ins[2][i] + at, l.ins[3][i] + at,
              l.outs[0][i] + at, l.outs[1][i] + at, l.outs[2][i] + at, n, h);
  });
  return ffi::Error::Success();
}

ffi::Error MomentumImpl(ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                        ffi::RemainingRets rets, float momentum, float weight_decay,
                        bool nesterov) {
  if (scalars.element_count() != 3) {
    return ffi::Error::InvalidArgument("fdl_momentum_step: scalars must be f32[3]");
  }
  Leaves l;
  if (auto e = Collect(args, rets, 3, 2, &l); e.failure()) return e;
  MomentumHyper h{momentum, weight_decay, -scalars.typed_data()[0], nesterov};
  ParallelOverLeaves(l.sizes, [&](size_t i, int64_t at, int64_t n) {
    MomentumRange(l.ins[0][i] + at, l.ins[1][i] + at, l.ins[2][i] + at, l.outs[0][i] + at,
                  l.outs[1][i] + at, n, h);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlAdamStep, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<bool>("decoupled"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlMomentumStep, MomentumImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("momentum")
                                  .Attr<float>("weight_decay")
                                  .Attr<bool>("nesterov"));
