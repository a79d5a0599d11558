// fdl: oneDNN 2-D convolution (forward, backward-data, backward-weights) as XLA FFI handlers.
//
// Layouts: activations NHWC, kernels HWIO ((kh, kw, in/groups, out)), float32, exactly the
// semantics of lax.conv_general_dilated with explicit non-negative padding.
// Leading dims beyond rank 4 come from jax.ffi.ffi_call(vmap_method="expand_dims"): each buffer
// has the same number of leading dims, every one either the full batch size or 1. When the kernel
// (the second operand of forward/backward-data) is unbatched the leading dims are folded into N
// (one call); otherwise the handler loops over the broadcast leading index.
//
// Primitives are cached per geometry (thread-safe); the kernel is reordered into the layout the
// chosen oneDNN implementation prefers (format_tag::any) on every call (it is small), unless
// that layout is byte-identical to HWIO (checked once per primitive).
//
// Implementation choice: oneDNN's first choice is not always its fastest. Forward: its direct
// "jit:avx512_core" kernel instead of "brgconv" when the output has <= 16 pixels per image or
// the input has < 8 channels per group (the ResNet-18 CIFAR 4x4 layers; docs/performance.md).
// Everything else: oneDNN's default (for stride-1 backward-data that is itself a forward
// brgconv kernel on the flipped weights, "brg_fwd").
//
// Threads and serialisation (attribute `threads`):
// - 0 (one device): XLA's thunk executor runs independent custom calls concurrently (e.g.
//   backward-data and backward-weights of one layer); each oneDNN call already uses every core
//   through OpenMP, so concurrent calls would oversubscribe the cores (two OpenMP teams spinning
//   against each other). A process-wide mutex runs one convolution at a time.
// - k > 0 (a shard of a sharded jit: the devices' shards run at the same time on their own
//   threads): the call uses k OpenMP threads (this thread's omp_set_num_threads, restored
//   after) and takes no lock, so the shards share the cores instead of queueing for all of them.
//   Primitives are cached per thread count (oneDNN sizes its work split when it creates them).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// From libgomp, which libdnnl links.
extern "C" int omp_get_max_threads(void);
extern "C" void omp_set_num_threads(int);

// The build record (fdl/_ext/build.py): read from the file's bytes before it is ever loaded.
#ifndef FDL_BUILD_INFO
#define FDL_BUILD_INFO ""
#endif
extern "C" __attribute__((used)) const char fdl_build_info[] = "FDL_BUILD_INFO{" FDL_BUILD_INFO "}";

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Geom {
  int64_t n, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, g;
  int64_t threads = 0;  // OpenMP threads the primitive was created for (0: the default)
  auto key() const {
    return std::make_tuple(n, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, g,
                           threads);
  }
};

struct Entry {
  dnnl::primitive prim;
  memory::desc user_w;  // HWIO (or hwigo) user layout
  memory::desc prim_w;  // layout the primitive wants
  memory::desc src, dst;
  bool need_reorder = false;
  std::string impl;
  dnnl::reorder reorder;  // user->prim (fwd, bwd_data) or prim->user (bwd_weights)
  memory::desc scratch;
};

memory::desc act_md(int64_t n, int64_t c, int64_t h, int64_t w) {
  return memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
}

memory::desc w_md(const Geom& g, bool any) {
  if (g.g == 1) {
    return memory::desc({g.oc, g.ic, g.kh, g.kw}, dt::f32, any ? tag::any : tag::hwio);
  }
  return memory::desc({g.g, g.oc / g.g, g.ic / g.g, g.kh, g.kw}, dt::f32,
                      any ? tag::any : tag::hwigo);
}

// The implementation (oneDNN's impl_info_str) to prefer for this pass and geometry, or "" for
// oneDNN's own first choice. See the note at the top of the file.
std::string preferred_impl(Kind kind, const Geom& g) {
  const int64_t icg = g.ic / g.g;
  if (kind == kFwd && (g.oh * g.ow <= 16 || icg < 8)) return "jit:avx512_core";
  return "";
}

// Build a primitive descriptor with `make` and step through oneDNN's implementation list to
// `want` (exact impl_info_str); fall back to the first implementation if `want` is absent.
template <typename PD, typename Make>
PD pick_impl(Make make, const std::string& want) {
  PD pd = make();
  if (want.empty() || pd.impl_info_str() == want) return pd;
  while (pd.next_impl()) {
    if (pd.impl_info_str() == want) return pd;
  }
  return make();
}

dnnl::convolution_forward::primitive_desc fwd_pd(const Geom& g, const memory::desc& src,
                                                  const memory::desc& dst,
                                                  const std::string& want) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return pick_impl<dnnl::convolution_forward::primitive_desc>(
      [&] {
        return dnnl::convolution_forward::primitive_desc(
            cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            src, w_md(g, true), dst, {g.sh, g.sw}, {g.dh - 1, g.dw - 1}, {g.pt, g.pl},
            {g.pb, g.pr}, attr);
      },
      want);
}

// Whether reordering between `a` and `b` is the identity on the bytes (e.g. Acdb64a and HWIO
// for 64 output channels): run the reorder once on an index pattern and compare.
bool same_bytes(const memory::desc& a, const memory::desc& b) {
  if (a == b) return true;
  if (a.get_size() != b.get_size()) return false;
  const size_t n = a.get_size() / sizeof(float);
  std::vector<float> in(n), out(n, -1.f);
  for (size_t i = 0; i < n; ++i) in[i] = static_cast<float>(i);
  auto& eng = cpu_engine();
  memory ma(a, eng, in.data()), mb(b, eng, out.data());
  dnnl::stream s(eng);
  dnnl::reorder(dnnl::reorder::primitive_desc(eng, a, eng, b)).execute(s, ma, mb);
  s.wait();
  return std::memcmp(in.data(), out.data(), n * sizeof(float)) == 0;
}

std::shared_ptr<Entry> make_entry(Kind kind, const Geom& g) {
  auto e = std::make_shared<Entry>();
  const std::string want = preferred_impl(kind, g);
  memory::desc src = act_md(g.n, g.ic, g.ih, g.iw);
  memory::desc dst = act_md(g.n, g.oc, g.oh, g.ow);
  e->src = src;
  e->dst = dst;
  e->user_w = w_md(g, false);
  auto fpd = fwd_pd(g, src, dst, kind == kFwd ? want : preferred_impl(kFwd, g));
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (kind == kFwd) {
    e->prim = dnnl::convolution_forward(fpd);
    e->prim_w = fpd.weights_desc();
    e->scratch = fpd.scratchpad_desc();
    e->impl = fpd.impl_info_str();
  } else if (kind == kBwdData) {
    auto pd = pick_impl<dnnl::convolution_backward_data::primitive_desc>(
        [&] {
          return dnnl::convolution_backward_data::primitive_desc(
              cpu_engine(), dnnl::algorithm::convolution_direct, src, w_md(g, true), dst,
              {g.sh, g.sw}, {g.dh - 1, g.dw - 1}, {g.pt, g.pl}, {g.pb, g.pr}, fpd, attr);
        },
        want);
    e->prim = dnnl::convolution_backward_data(pd);
    e->impl = pd.impl_info_str();
    e->prim_w = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else {
    auto pd = pick_impl<dnnl::convolution_backward_weights::primitive_desc>(
        [&] {
          return dnnl::convolution_backward_weights::primitive_desc(
              cpu_engine(), dnnl::algorithm::convolution_direct, src, w_md(g, true), dst,
              {g.sh, g.sw}, {g.dh - 1, g.dw - 1}, {g.pt, g.pl}, {g.pb, g.pr}, fpd, attr);
        },
        want);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->impl = pd.impl_info_str();
    e->prim_w = pd.diff_weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  e->need_reorder = !same_bytes(e->user_w, e->prim_w);
  if (e->need_reorder) {
    if (kind == kBwdWeights) {
      e->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), e->prim_w,
                                                               cpu_engine(), e->user_w));
    } else {
      e->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), e->user_w,
                                                               cpu_engine(), e->prim_w));
    }
  }
  return e;
}

std::shared_ptr<Entry> get_entry(Kind kind, const Geom& g) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, decltype(g.key())>, std::shared_ptr<Entry>> cache;
  auto k = std::make_tuple(static_cast<int64_t>(kind), g.key());
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  auto e = make_entry(kind, g);
  std::lock_guard<std::mutex> lock(mu);
  cache.emplace(k, e);
  return e;
}

// A grow-only, 64-byte aligned, uninitialised scratch buffer per thread and purpose (fresh,
// zero-filled buffers per call cost page faults and a memset of up to 9.4 MB per call).
struct ThreadBuf {
  void* p = nullptr;
  size_t cap = 0;
  ~ThreadBuf() { std::free(p); }
  void* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = (n + 63) / 64 * 64;
      p = std::aligned_alloc(64, cap);
      if (p == nullptr) {
        cap = 0;
        throw std::bad_alloc();
      }
    }
    return p;
  }
};

// One convolution call on raw pointers. a/b/out meaning depends on kind:
// fwd: x, w -> y;  bwd_data: dy, w -> dx;  bwd_weights: x, dy -> dw.
void run_one(Kind kind, const Geom& g, const float* a, const float* b, float* out) {
  auto e = get_entry(kind, g);
  auto& eng = cpu_engine();
  dnnl::stream s(eng);
  thread_local ThreadBuf scratch_buf, wbuf;
  memory scratch(e->scratch, eng, scratch_buf.get(e->scratch.get_size()));
  if (kind == kFwd || kind == kBwdData) {
    memory user_w(e->user_w, eng, const_cast<float*>(b));
    memory w = user_w;
    if (e->need_reorder) {
      w = memory(e->prim_w, eng, wbuf.get(e->prim_w.get_size()));
      e->reorder.execute(s, user_w, w);
    }
    if (kind == kFwd) {
      memory x(e->src, eng, const_cast<float*>(a));
      memory y(e->dst, eng, out);
      e->prim.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      memory dy(e->dst, eng, const_cast<float*>(a));
      memory dx(e->src, eng, out);
      e->prim.execute(s, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w},
                          {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, scratch}});
    }
  } else {
    memory x(e->src, eng, const_cast<float*>(a));
    memory dy(e->dst, eng, const_cast<float*>(b));
    memory user_dw(e->user_w, eng, out);
    memory dw = user_dw;
    if (e->need_reorder) {
      dw = memory(e->prim_w, eng, wbuf.get(e->prim_w.get_size()));
    }
    e->prim.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_WEIGHTS, dw},
                        {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e->need_reorder) e->reorder.execute(s, dw, user_dw);
  }
  s.wait();
}

int64_t prod(const std::vector<int64_t>& v) {
  int64_t p = 1;
  for (auto x : v) p *= x;
  return p;
}

template <typename Dims>
std::vector<int64_t> leading(const Dims& d) {
  std::vector<int64_t> v;
  for (size_t i = 0; i + 4 < d.size(); ++i) v.push_back(d[i]);
  return v;
}

template <typename Dims>
int64_t tail(const Dims& d, int i) {  // i in 0..3 of the last four dims
  return d[d.size() - 4 + i];
}

ffi::Error run(Kind kind, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t groups,
               int64_t threads) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto od = out->dimensions();
  if (ad.size() < 4 || ad.size() != bd.size() || ad.size() != od.size()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl conv: bad operand ranks");
  }
  // x, y, w dims (last four) according to kind.
  Geom g{};
  g.sh = sh; g.sw = sw; g.pt = pt; g.pb = pb; g.pl = pl; g.pr = pr; g.dh = dh; g.dw = dw;
  g.g = groups;
  g.threads = threads > 0 ? threads : 0;
  auto set_x = [&](auto& d) { g.n = tail(d, 0); g.ih = tail(d, 1); g.iw = tail(d, 2); g.ic = tail(d, 3); };
  auto set_y = [&](auto& d) { g.oh = tail(d, 1); g.ow = tail(d, 2); g.oc = tail(d, 3); };
  auto set_w = [&](auto& d) { g.kh = tail(d, 0); g.kw = tail(d, 1); };
  if (kind == kFwd) { set_x(ad); set_w(bd); set_y(od); }
  else if (kind == kBwdData) { set_y(ad); set_w(bd); set_x(od); }
  else { set_x(ad); set_y(bd); set_w(od); }
  if (g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 || g.g < 1 ||
      (g.ih + g.pt + g.pb - (g.dh * (g.kh - 1) + 1)) != (g.oh - 1) * g.sh ||
      (g.iw + g.pl + g.pr - (g.dw * (g.kw - 1) + 1)) != (g.ow - 1) * g.sw) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fdl conv: geometry must be exact (crop unused input/padding first)");
  }
  std::vector<int64_t> la = leading(ad), lb = leading(bd), lo = leading(od);
  const int64_t a_sz = tail(ad, 0) * tail(ad, 1) * tail(ad, 2) * tail(ad, 3);
  const int64_t b_sz = tail(bd, 0) * tail(bd, 1) * tail(bd, 2) * tail(bd, 3);
  const int64_t o_sz = tail(od, 0) * tail(od, 1) * tail(od, 2) * tail(od, 3);
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* op = out->typed_data();
  static std::mutex serial_mu;
  std::unique_lock<std::mutex> serial(serial_mu, std::defer_lock);
  struct OmpThreads {  // this thread's OpenMP team size for the call, restored on exit
    int saved = -1;
    ~OmpThreads() { if (saved > 0) omp_set_num_threads(saved); }
  } omp;
  if (g.threads > 0) {
    omp.saved = omp_get_max_threads();
    omp_set_num_threads(static_cast<int>(g.threads));
  } else {
    serial.lock();
  }
  try {
    const int64_t nb = prod(lo);
    if (nb == 1) {
      run_one(kind, g, ap, bp, op);
    } else if (kind != kBwdWeights && prod(lb) == 1 && la == lo) {
      // Kernel unbatched: fold the vmapped axes into N.
      Geom gf = g;
      gf.n = g.n * nb;
      run_one(kind, gf, ap, bp, op);
    } else {
      // General broadcast loop over the leading index.
      const size_t r = lo.size();
      std::vector<int64_t> idx(r, 0);
      for (int64_t flat = 0; flat < nb; ++flat) {
        int64_t rem = flat, oa = 0, ob = 0, sa = 1, sb = 1;
        for (size_t i = r; i-- > 0;) {
          idx[i] = rem % lo[i];
          rem /= lo[i];
        }
        for (size_t i = r; i-- > 0;) {
          if (la[i] != 1) oa += idx[i] * sa;
          if (lb[i] != 1) ob += idx[i] * sb;
          sa *= la[i];
          sb *= lb[i];
        }
        run_one(kind, g, ap + oa * a_sz, bp + ob * b_sz, op + flat * o_sz);
      }
    }
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("fdl conv (oneDNN): ") + err.what());
  }
  return ffi::Error::Success();
}

#define FDL_BIND()                                                               \
  ffi::Ffi::Bind()                                                               \
      .Arg<ffi::Buffer<ffi::F32>>()                                              \
      .Arg<ffi::Buffer<ffi::F32>>()                                              \
      .Ret<ffi::Buffer<ffi::F32>>()                                              \
      .Attr<int64_t>("sh").Attr<int64_t>("sw")                                   \
      .Attr<int64_t>("pt").Attr<int64_t>("pb")                                   \
      .Attr<int64_t>("pl").Attr<int64_t>("pr")                                   \
      .Attr<int64_t>("dh").Attr<int64_t>("dw")                                   \
      .Attr<int64_t>("groups")                                                   \
      .Attr<int64_t>("threads")

ffi::Error FwdImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> o, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t g,
                   int64_t threads) {
  return run(kFwd, a, b, o, sh, sw, pt, pb, pl, pr, dh, dw, g, threads);
}
ffi::Error BwdDataImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> o, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t g,
                       int64_t threads) {
  return run(kBwdData, a, b, o, sh, sw, pt, pb, pl, pr, dh, dw, g, threads);
}
ffi::Error BwdWeightsImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                          ffi::ResultBuffer<ffi::F32> o, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t g,
                          int64_t threads) {
  return run(kBwdWeights, a, b, o, sh, sw, pt, pb, pl, pr, dh, dw, g, threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlConvFwd, FwdImpl, FDL_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlConvBwdData, BwdDataImpl, FDL_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlConvBwdWeights, BwdWeightsImpl, FDL_BIND());

extern "C" int fdl_conv_onednn_abi_version() { return 1; }

// The oneDNN implementation used for a pass (0 fwd, 1 bwd-data, 2 bwd-weights) and exact
// NHWC/HWIO geometry, written to buf (for tests and docs).
extern "C" int fdl_conv_onednn_impl(int kind, const int64_t* geom, char* buf, int len) {
  Geom g{};
  g.n = geom[0]; g.ih = geom[1]; g.iw = geom[2]; g.ic = geom[3]; g.oh = geom[4]; g.ow = geom[5];
  g.oc = geom[6]; g.kh = geom[7]; g.kw = geom[8]; g.sh = geom[9]; g.sw = geom[10];
  g.pt = geom[11]; g.pb = geom[12]; g.pl = geom[13]; g.pr = geom[14]; g.dh = geom[15];
  g.dw = geom[16]; g.g = geom[17];
  try {
    auto e = get_entry(static_cast<Kind>(kind), g);
    std::snprintf(buf, len, "%s%s", e->impl.c_str(), e->need_reorder ? "" : " (no reorder)");
  } catch (const dnnl::error& err) {
    std::snprintf(buf, len, "error: %s", err.what());
    return 1;
  }
  return 0;
}
