// fdl: one direction of a one-layer LSTM or GRU (forward training, forward inference,
// backward) through oneDNN's RNN primitives (lstm_forward/backward, lbr_gru_forward/backward),
// as XLA FFI handlers. float32, time-major.
//
// Why: the whole direction -- input projection, recurrence, every gradient -- is one oneDNN
// call that uses all cores through its OpenMP runtime (per-step GEMMs, elementwise passes and
// the weight-gradient GEMMs), where fdl's native loop (rnn_cpu.cc) runs its per-step sgemm on
// one core. The JAX side (layouts, gate order, when it is used) is in fdl/nn/recurrent.py
// (_rnn_onednn).
//
// Layouts: weights are oneDNN's ldigo (L = D = 1): (C, G*H) / (H, G*H) with G gate blocks,
// biases ldgo (4, H), states (B, H) ldnc, sequences (T, B, C) tnc.
// LSTM: gates [i, f, c~, o] = fdl's/PyTorch's [i, f, g, o] as they are; bias = b_ih + b_hh.
// GRU (linear-before-reset = PyTorch's GRU): gates [u, r, o] = fdl's [z, r, n] (the JAX side
// swaps fdl's [r, z, n] blocks); bias [b_z, b_r, b_in, b_hn] with b_z, b_r = b_ih + b_hh.
//
//   FdlLstmDnnlFwd(xs (T,B,C), w_ih (C,4H), w_hh (H,4H), b (4H), h0, c0 (B,H))
//     -> ys (T,B,H), h_n, c_n (B,H), workspace (bytes,) u8          (forward_training)
//   FdlLstmDnnlInfer(the same operands) -> ys, h_n, c_n            (forward_inference)
//   FdlLstmDnnlBwd(xs, w_ih, w_hh, b, h0, c0, ys, h_n, c_n, workspace, d_ys, d_hn, d_cn)
//     -> d_xs (T,B,C), d_w_ih (C,4H), d_w_hh (H,4H), d_b (4H), dh0, dc0 (B,H)
//   FdlGruDnnlFwd(xs, w_ih (C,3H), w_hh (H,3H), b (4H), h0) -> ys, h_n, workspace
//   FdlGruDnnlInfer(the same operands) -> ys, h_n
//   FdlGruDnnlBwd(xs, w_ih, w_hh, b, h0, ys, h_n, workspace, d_ys, d_hn)
//     -> d_xs, d_w_ih, d_w_hh, d_b (4H), dh0
//
// The workspace (what forward_training keeps for backward) is an opaque byte buffer whose size
// the JAX side asks for at trace time through FdlRnnDnnlWorkspaceBytes (ctypes).
//
// Calls are serialised by a process-wide mutex (XLA may run the two directions of a
// bidirectional layer concurrently; each call already uses every core) and executed on one
// dedicated thread (see Master).

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <thread>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

// From libgomp, which libdnnl links.
extern "C" int omp_get_max_threads(void);
extern "C" void omp_set_num_threads(int);
extern "C" int omp_pause_resource_all(int kind);  // OpenMP 5.0; 1 = omp_pause_soft

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// 1: after each call, release the calling thread's OpenMP workers (omp_pause_resource_all)
// instead of leaving them spinning (libgomp spins GOMP_SPINCOUNT iterations, milliseconds,
// after each parallel region before sleeping) on cores XLA's next ops need.
int g_pause = 1;

// 0: leave OpenMP's thread count alone; n > 0: run each call with n threads (restored after).
int g_threads = 0;

struct ThreadScope {
  int saved = 0;
  explicit ThreadScope(int n) {
    if (n > 0) {
      saved = omp_get_max_threads();
      omp_set_num_threads(n);
    }
  }
  ~ThreadScope() {
    if (saved > 0) omp_set_num_threads(saved);
  }
};

// Every oneDNN execution runs on one dedicated thread of this library (the caller, an XLA
// worker thread, sleeps on a condition variable meanwhile). Why: libgomp keeps one OpenMP
// thread pool per master thread, and a pool's workers spin for a while (GOMP_SPINCOUNT) after
// each parallel region. Called directly from XLA's worker threads, the forward and the backward
// of one step can land on different workers, i.e. different pools: the first pool's worker
// still spins on one core while the second pool computes on both. One master thread = one
// pool, whose spinning worker is the one the next call needs.
class Master {
 public:
  static Master& get() {
    static Master* m = new Master();  // never destroyed: the thread outlives static teardown
    return *m;
  }
  template <typename F>
  void run(F&& f) {
    if (!g_use_master) {
      f();
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    job_ = [&f] { f(); };
    done_ = false;
    cv_.notify_all();
    cv_.wait(lock, [this] { return done_; });
  }
  static inline bool g_use_master = true;

 private:
  Master() { std::thread([this] { loop(); }).detach(); }
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return static_cast<bool>(job_); });
      std::function<void()> job = std::move(job_);
      job_ = nullptr;
      lock.unlock();
      job();
      lock.lock();
      done_ = true;
      cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::function<void()> job_;
  bool done_ = true;
};

enum Kind : int64_t { kLstm = 0, kLbrGru = 1 };

struct Geom {
  int64_t kind, t, b, c, h;
  auto key() const { return std::make_tuple(kind, t, b, c, h); }
  int64_t gates() const { return kind == kLstm ? 4 : 3; }
  // bias blocks: the LSTM's 4 gates; the GRU's 3 gates + the recurrent candidate bias
  int64_t bias_gates() const { return 4; }
};

// One cached (kind, T, B, C, H): the primitives, the memory descriptors of the user layouts and
// buffers reused by every call (calls are serialised): the scratchpads (user mode: with
// oneDNN's library mode a primitive created on one thread crashed when executed on another, as
// XLA's worker threads do) and the backward's reordered weights.
struct Rnn {
  Geom g;
  memory::desc src, iter, wl, wi, bias, dst, ws;
  dnnl::primitive fwd, bwd, infer;
  bool has_infer = false;
  bool reorder_wl = false, reorder_wi = false;
  dnnl::reorder to_bwd_wl, to_bwd_wi;
  memory fwd_scratch, bwd_scratch, infer_scratch, wl_bwd, wi_bwd, wl_scratch, wi_scratch;
};

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

const auto kDir = dnnl::rnn_direction::unidirectional_left2right;

void make_backward_weights(Rnn& e, const memory::desc& wl_b, const memory::desc& wi_b) {
  const auto attr = user_scratchpad();
  e.reorder_wl = !(wl_b == e.wl);
  e.reorder_wi = !(wi_b == e.wi);
  if (e.reorder_wl) {
    dnnl::reorder::primitive_desc rpd(cpu_engine(), e.wl, cpu_engine(), wl_b, attr);
    e.to_bwd_wl = dnnl::reorder(rpd);
    e.wl_scratch = memory(rpd.scratchpad_desc(), cpu_engine());
    e.wl_bwd = memory(wl_b, cpu_engine());
  }
  if (e.reorder_wi) {
    dnnl::reorder::primitive_desc rpd(cpu_engine(), e.wi, cpu_engine(), wi_b, attr);
    e.to_bwd_wi = dnnl::reorder(rpd);
    e.wi_scratch = memory(rpd.scratchpad_desc(), cpu_engine());
    e.wi_bwd = memory(wi_b, cpu_engine());
  }
}

std::unique_ptr<Rnn> make_rnn(const Geom& g) {
  auto e = std::make_unique<Rnn>();
  e->g = g;
  const int64_t G = g.gates();
  e->src = memory::desc({g.t, g.b, g.c}, dt::f32, tag::tnc);
  e->iter = memory::desc({1, 1, g.b, g.h}, dt::f32, tag::ldnc);
  e->wl = memory::desc({1, 1, g.c, G, g.h}, dt::f32, tag::ldigo);
  e->wi = memory::desc({1, 1, g.h, G, g.h}, dt::f32, tag::ldigo);
  e->bias = memory::desc({1, 1, g.bias_gates(), g.h}, dt::f32, tag::ldgo);
  e->dst = memory::desc({g.t, g.b, g.h}, dt::f32, tag::tnc);
  memory::desc wl_any({1, 1, g.c, G, g.h}, dt::f32, tag::any);
  memory::desc wi_any({1, 1, g.h, G, g.h}, dt::f32, tag::any);
  const auto attr = user_scratchpad();
  const auto train = dnnl::prop_kind::forward_training;
  if (g.kind == kLstm) {
    dnnl::lstm_forward::desc fd(train, kDir, e->src, e->iter, e->iter, e->wl, e->wi, e->bias,
                                e->dst, e->iter, e->iter);
    dnnl::lstm_forward::primitive_desc fpd(fd, attr, cpu_engine());
    dnnl::lstm_backward::desc bd(dnnl::prop_kind::backward, kDir, e->src, e->iter, e->iter,
                                 wl_any, wi_any, e->bias, e->dst, e->iter, e->iter, e->src,
                                 e->iter, e->iter, e->wl, e->wi, e->bias, e->dst, e->iter,
                                 e->iter);
    dnnl::lstm_backward::primitive_desc bpd(bd, attr, cpu_engine(), fpd);
    e->fwd = dnnl::lstm_forward(fpd);
    e->bwd = dnnl::lstm_backward(bpd);
    e->ws = fpd.workspace_desc();
    e->fwd_scratch = memory(fpd.scratchpad_desc(), cpu_engine());
    e->bwd_scratch = memory(bpd.scratchpad_desc(), cpu_engine());
    make_backward_weights(*e, bpd.weights_layer_desc(), bpd.weights_iter_desc());
  } else {
    dnnl::lbr_gru_forward::desc fd(train, kDir, e->src, e->iter, e->wl, e->wi, e->bias, e->dst,
                                   e->iter);
    dnnl::lbr_gru_forward::primitive_desc fpd(fd, attr, cpu_engine());
    dnnl::lbr_gru_backward::desc bd(dnnl::prop_kind::backward, kDir, e->src, e->iter, wl_any,
                                    wi_any, e->bias, e->dst, e->iter, e->src, e->iter, e->wl,
                                    e->wi, e->bias, e->dst, e->iter);
    dnnl::lbr_gru_backward::primitive_desc bpd(bd, attr, cpu_engine(), fpd);
    e->fwd = dnnl::lbr_gru_forward(fpd);
    e->bwd = dnnl::lbr_gru_backward(bpd);
    e->ws = fpd.workspace_desc();
    e->fwd_scratch = memory(fpd.scratchpad_desc(), cpu_engine());
    e->bwd_scratch = memory(bpd.scratchpad_desc(), cpu_engine());
    make_backward_weights(*e, bpd.weights_layer_desc(), bpd.weights_iter_desc());
  }
  return e;
}

void ensure_infer(Rnn& e) {  // call with g_mu held
  if (e.has_infer) return;
  const auto attr = user_scratchpad();
  const auto inf = dnnl::prop_kind::forward_inference;
  if (e.g.kind == kLstm) {
    dnnl::lstm_forward::desc fd(inf, kDir, e.src, e.iter, e.iter, e.wl, e.wi, e.bias, e.dst,
                                e.iter, e.iter);
    dnnl::lstm_forward::primitive_desc pd(fd, attr, cpu_engine());
    e.infer = dnnl::lstm_forward(pd);
    e.infer_scratch = memory(pd.scratchpad_desc(), cpu_engine());
  } else {
    dnnl::lbr_gru_forward::desc fd(inf, kDir, e.src, e.iter, e.wl, e.wi, e.bias, e.dst, e.iter);
    dnnl::lbr_gru_forward::primitive_desc pd(fd, attr, cpu_engine());
    e.infer = dnnl::lbr_gru_forward(pd);
    e.infer_scratch = memory(pd.scratchpad_desc(), cpu_engine());
  }
  e.has_infer = true;
}

std::mutex g_mu;  // guards the cache and serialises execution

Rnn& entry(const Geom& g) {  // call with g_mu held
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>, std::unique_ptr<Rnn>>
      cache;
  auto& slot = cache[g.key()];
  if (!slot) slot = make_rnn(g);
  return *slot;
}

// Run primitives on the master thread (with g_threads OpenMP threads if set); rethrows.
// With g_pause, the master's OpenMP workers are released after the last one.
using Step = std::pair<const dnnl::primitive*, std::unordered_map<int, memory>>;
void execute(const std::vector<Step>& steps) {
  std::string error;
  Master::get().run([&] {
    try {
      ThreadScope threads(g_threads);
      dnnl::stream s(cpu_engine());
      for (const auto& st : steps) st.first->execute(s, st.second);
      s.wait();
    } catch (const dnnl::error& err) {
      error = err.what();
    }
    if (g_pause) omp_pause_resource_all(1);
  });
  if (!error.empty()) throw std::runtime_error(error);
}

memory wrap(const memory::desc& d, const void* p) {
  return memory(d, cpu_engine(), const_cast<void*>(p));
}

ffi::Error bad(const char* what, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string("fdl ") + what +
                                                          " (oneDNN): " + msg);
}

ffi::Error internal(const char* what, const std::exception& err) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("fdl ") + what + " (oneDNN): " +
                                                   err.what());
}

bool geom_of(int64_t kind, ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& w_hh, Geom* g) {
  auto d = xs.dimensions();
  auto w = w_hh.dimensions();
  const int64_t G = kind == kLstm ? 4 : 3;
  if (d.size() != 3 || w.size() != 2 || w[1] != G * w[0]) return false;
  *g = Geom{kind, d[0], d[1], d[2], w[0]};
  return g->t > 0 && g->b > 0 && g->c > 0 && g->h > 0;
}

// ---------------------------------------------------------------------------------- forward

// c0/c_n are null for the GRU; ws null = inference.
ffi::Error Forward(int64_t kind, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih,
                   ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b,
                   ffi::Buffer<ffi::F32> h0, const float* c0, float* ys, float* h_n, float* c_n,
                   void* ws, size_t ws_bytes) {
  const char* what = kind == kLstm ? "lstm fwd" : "gru fwd";
  Geom g;
  if (!geom_of(kind, xs, w_hh, &g)) return bad(what, "bad shapes");
  try {
    std::lock_guard<std::mutex> lock(g_mu);
    Rnn& e = entry(g);
    const bool training = ws != nullptr;
    if (training && ws_bytes != e.ws.get_size()) return bad(what, "workspace size");
    if (!training) ensure_infer(e);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC_LAYER, wrap(e.src, xs.typed_data())},
        {DNNL_ARG_SRC_ITER, wrap(e.iter, h0.typed_data())},
        {DNNL_ARG_WEIGHTS_LAYER, wrap(e.wl, w_ih.typed_data())},
        {DNNL_ARG_WEIGHTS_ITER, wrap(e.wi, w_hh.typed_data())},
        {DNNL_ARG_BIAS, wrap(e.bias, b.typed_data())},
        {DNNL_ARG_DST_LAYER, wrap(e.dst, ys)},
        {DNNL_ARG_DST_ITER, wrap(e.iter, h_n)}};
    if (kind == kLstm) {
      args[DNNL_ARG_SRC_ITER_C] = wrap(e.iter, c0);
      args[DNNL_ARG_DST_ITER_C] = wrap(e.iter, c_n);
    }
    if (training) {
      args[DNNL_ARG_WORKSPACE] = wrap(e.ws, ws);
      args[DNNL_ARG_SCRATCHPAD] = e.fwd_scratch;
    } else {
      args[DNNL_ARG_SCRATCHPAD] = e.infer_scratch;
    }
    execute({{training ? &e.fwd : &e.infer, std::move(args)}});
  } catch (const std::exception& err) {
    return internal(what, err);
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using R32 = ffi::ResultBuffer<ffi::F32>;

ffi::Error LstmTrainImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, F32 c0, R32 ys, R32 h_n,
                         R32 c_n, ffi::ResultBuffer<ffi::U8> ws) {
  return Forward(kLstm, xs, w_ih, w_hh, b, h0, c0.typed_data(), ys->typed_data(),
                 h_n->typed_data(), c_n->typed_data(), ws->untyped_data(), ws->size_bytes());
}

ffi::Error LstmInferImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, F32 c0, R32 ys, R32 h_n,
                         R32 c_n) {
  return Forward(kLstm, xs, w_ih, w_hh, b, h0, c0.typed_data(), ys->typed_data(),
                 h_n->typed_data(), c_n->typed_data(), nullptr, 0);
}

ffi::Error GruTrainImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, R32 ys, R32 h_n,
                        ffi::ResultBuffer<ffi::U8> ws) {
  return Forward(kLbrGru, xs, w_ih, w_hh, b, h0, nullptr, ys->typed_data(), h_n->typed_data(),
                 nullptr, ws->untyped_data(), ws->size_bytes());
}

ffi::Error GruInferImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, R32 ys, R32 h_n) {
  return Forward(kLbrGru, xs, w_ih, w_hh, b, h0, nullptr, ys->typed_data(), h_n->typed_data(),
                 nullptr, nullptr, 0);
}

// ---------------------------------------------------------------------------------- backward

struct BwdIn {
  const float *c0, *c_n, *d_cn;  // LSTM only
};
struct BwdOut {
  float *d_xs, *d_w_ih, *d_w_hh, *d_b, *dh0, *dc0;  // dc0: LSTM only
  size_t w_ih_bytes, w_hh_bytes, b_bytes;
};

ffi::Error Backward(int64_t kind, F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, F32 ys, F32 h_n,
                    ffi::Buffer<ffi::U8> ws, F32 d_ys, F32 d_hn, BwdIn in, BwdOut out) {
  const char* what = kind == kLstm ? "lstm bwd" : "gru bwd";
  Geom g;
  if (!geom_of(kind, xs, w_hh, &g)) return bad(what, "bad shapes");
  try {
    std::lock_guard<std::mutex> lock(g_mu);
    Rnn& e = entry(g);
    if (ws.size_bytes() != e.ws.get_size()) return bad(what, "workspace size");
    std::vector<Step> steps;
    memory wl = wrap(e.wl, w_ih.typed_data()), wi = wrap(e.wi, w_hh.typed_data());
    memory wl_b = wl, wi_b = wi;
    if (e.reorder_wl) {
      wl_b = e.wl_bwd;
      steps.push_back({&e.to_bwd_wl, {{DNNL_ARG_FROM, wl}, {DNNL_ARG_TO, wl_b},
                                      {DNNL_ARG_SCRATCHPAD, e.wl_scratch}}});
    }
    if (e.reorder_wi) {
      wi_b = e.wi_bwd;
      steps.push_back({&e.to_bwd_wi, {{DNNL_ARG_FROM, wi}, {DNNL_ARG_TO, wi_b},
                                      {DNNL_ARG_SCRATCHPAD, e.wi_scratch}}});
    }
    // the weight and bias gradients are accumulated into
    std::memset(out.d_w_ih, 0, out.w_ih_bytes);
    std::memset(out.d_w_hh, 0, out.w_hh_bytes);
    std::memset(out.d_b, 0, out.b_bytes);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC_LAYER, wrap(e.src, xs.typed_data())},
        {DNNL_ARG_SRC_ITER, wrap(e.iter, h0.typed_data())},
        {DNNL_ARG_WEIGHTS_LAYER, wl_b},
        {DNNL_ARG_WEIGHTS_ITER, wi_b},
        {DNNL_ARG_BIAS, wrap(e.bias, b.typed_data())},
        {DNNL_ARG_DST_LAYER, wrap(e.dst, ys.typed_data())},
        {DNNL_ARG_DST_ITER, wrap(e.iter, h_n.typed_data())},
        {DNNL_ARG_WORKSPACE, wrap(e.ws, ws.untyped_data())},
        {DNNL_ARG_DIFF_SRC_LAYER, wrap(e.src, out.d_xs)},
        {DNNL_ARG_DIFF_SRC_ITER, wrap(e.iter, out.dh0)},
        {DNNL_ARG_DIFF_WEIGHTS_LAYER, wrap(e.wl, out.d_w_ih)},
        {DNNL_ARG_DIFF_WEIGHTS_ITER, wrap(e.wi, out.d_w_hh)},
        {DNNL_ARG_DIFF_BIAS, wrap(e.bias, out.d_b)},
        {DNNL_ARG_DIFF_DST_LAYER, wrap(e.dst, d_ys.typed_data())},
        {DNNL_ARG_DIFF_DST_ITER, wrap(e.iter, d_hn.typed_data())},
        {DNNL_ARG_SCRATCHPAD, e.bwd_scratch}};
    if (kind == kLstm) {
      args[DNNL_ARG_SRC_ITER_C] = wrap(e.iter, in.c0);
      args[DNNL_ARG_DST_ITER_C] = wrap(e.iter, in.c_n);
      args[DNNL_ARG_DIFF_DST_ITER_C] = wrap(e.iter, in.d_cn);
      args[DNNL_ARG_DIFF_SRC_ITER_C] = wrap(e.iter, out.dc0);
    }
    steps.push_back({&e.bwd, std::move(args)});
    execute(steps);
  } catch (const std::exception& err) {
    return internal(what, err);
  }
  return ffi::Error::Success();
}

ffi::Error LstmBwdImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, F32 c0, F32 ys, F32 h_n,
                       F32 c_n, ffi::Buffer<ffi::U8> ws, F32 d_ys, F32 d_hn, F32 d_cn, R32 d_xs,
                       R32 d_w_ih, R32 d_w_hh, R32 d_b, R32 dh0, R32 dc0) {
  return Backward(kLstm, xs, w_ih, w_hh, b, h0, ys, h_n, ws, d_ys, d_hn,
                  BwdIn{c0.typed_data(), c_n.typed_data(), d_cn.typed_data()},
                  BwdOut{d_xs->typed_data(), d_w_ih->typed_data(), d_w_hh->typed_data(),
                         d_b->typed_data(), dh0->typed_data(), dc0->typed_data(),
                         d_w_ih->size_bytes(), d_w_hh->size_bytes(), d_b->size_bytes()});
}

ffi::Error GruBwdImpl(F32 xs, F32 w_ih, F32 w_hh, F32 b, F32 h0, F32 ys, F32 h_n,
                      ffi::Buffer<ffi::U8> ws, F32 d_ys, F32 d_hn, R32 d_xs, R32 d_w_ih,
                      R32 d_w_hh, R32 d_b, R32 dh0) {
  return Backward(kLbrGru, xs, w_ih, w_hh, b, h0, ys, h_n, ws, d_ys, d_hn,
                  BwdIn{nullptr, nullptr, nullptr},
                  BwdOut{d_xs->typed_data(), d_w_ih->typed_data(), d_w_hh->typed_data(),
                         d_b->typed_data(), dh0->typed_data(), nullptr, d_w_ih->size_bytes(),
                         d_w_hh->size_bytes(), d_b->size_bytes()});
}

}  // namespace

// Workspace bytes of the forward-training primitive for kind (0 LSTM, 1 linear-before-reset
// GRU) and (T, B, C, H); -1 if oneDNN has no implementation (the JAX side then uses another
// backend).
extern "C" int64_t FdlRnnDnnlWorkspaceBytes(int64_t kind, int64_t t, int64_t b, int64_t c,
                                            int64_t h) {
  if ((kind != kLstm && kind != kLbrGru) || t <= 0 || b <= 0 || c <= 0 || h <= 0) return -1;
  try {
    std::lock_guard<std::mutex> lock(g_mu);
    return static_cast<int64_t>(entry(Geom{kind, t, b, c, h}).ws.get_size());
  } catch (...) {
    return -1;
  }
}

// 1: execute on the dedicated master thread (default), 0: on the calling thread. Returns the
// previous value.
extern "C" int FdlRnnDnnlSetMasterThread(int on) {
  std::lock_guard<std::mutex> lock(g_mu);
  int old = Master::g_use_master;
  Master::g_use_master = on != 0;
  return old;
}

// 1: release the OpenMP workers after each call (default); returns the previous value.
extern "C" int FdlRnnDnnlSetPause(int on) {
  std::lock_guard<std::mutex> lock(g_mu);
  int old = g_pause;
  g_pause = on != 0;
  return old;
}

// OpenMP threads per call (0 = OpenMP's default); returns the previous value.
extern "C" int FdlRnnDnnlSetThreads(int n) {
  std::lock_guard<std::mutex> lock(g_mu);
  int old = g_threads;
  g_threads = n < 0 ? 0 : n;
  return old;
}

#define FDL_ARGS1 .Arg<ffi::Buffer<ffi::F32>>()
#define FDL_RETS1 .Ret<ffi::Buffer<ffi::F32>>()
#define FDL_ARGS5 FDL_ARGS1 FDL_ARGS1 FDL_ARGS1 FDL_ARGS1 FDL_ARGS1

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlLstmDnnlFwd, LstmTrainImpl,
                              ffi::Ffi::Bind() FDL_ARGS5 FDL_ARGS1 FDL_RETS1 FDL_RETS1 FDL_RETS1
                                  .Ret<ffi::Buffer<ffi::U8>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlLstmDnnlInfer, LstmInferImpl,
                              ffi::Ffi::Bind() FDL_ARGS5 FDL_ARGS1 FDL_RETS1 FDL_RETS1
                                  FDL_RETS1);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlLstmDnnlBwd, LstmBwdImpl,
                              ffi::Ffi::Bind() FDL_ARGS5 FDL_ARGS1 FDL_ARGS1 FDL_ARGS1 FDL_ARGS1
                                  .Arg<ffi::Buffer<ffi::U8>>() FDL_ARGS1 FDL_ARGS1 FDL_ARGS1
                                      FDL_RETS1 FDL_RETS1 FDL_RETS1 FDL_RETS1 FDL_RETS1
                                          FDL_RETS1);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlGruDnnlFwd, GruTrainImpl,
                              ffi::Ffi::Bind() FDL_ARGS5 FDL_RETS1 FDL_RETS1
                                  .Ret<ffi::Buffer<ffi::U8>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlGruDnnlInfer, GruInferImpl,
                              ffi::Ffi::Bind() FDL_ARGS5 FDL_RETS1 FDL_RETS1);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlGruDnnlBwd, GruBwdImpl,
                              ffi::Ffi::Bind() FDL_ARGS5 FDL_ARGS1 FDL_ARGS1
                                  .Arg<ffi::Buffer<ffi::U8>>() FDL_ARGS1 FDL_ARGS1 FDL_RETS1
                                      FDL_RETS1 FDL_RETS1 FDL_RETS1 FDL_RETS1);
