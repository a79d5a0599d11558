// fdl: the time loop of a one-direction LSTM / GRU layer (forward and backward) as XLA FFI
// handlers, float32, row-major, time-major.
//
// Why: inside an XLA while loop each step also pays ~10-13 thunk launches (elementwise, slice,
// concatenate, dynamic-update-slice) and thread hand-offs around its dot. Here each step is one
// single-threaded GEMM plus one vectorised elementwise pass. The input projection (all steps,
// one matmul) stays in XLA: see fdl/nn/recurrent/fused.py for the math and fdl/nn/recurrent/
// native.py for the calls. Measurements behind the choices: docs/results/sequence_lm.md.
//
// LSTM (gates [i, f, g, o], PyTorch's order):
//   FdlLstmFwd(xp (T,B,4H) aliased to acts, w_hh (H,4H), h0, c0 (B,H))
//     -> acts (T,B,4H) activated gates, ys (T,B,H), cs (T,B,H)
//     (on two threads when big enough, see use_two_threads and Team)
//   FdlLstmBwdDw(acts (T,B,4H) aliased to dgates, w_hh^T (4H,H), c0, cs, d_ys (T,B,H), dh_n,
//                dc_n, h0 (B,H), ys (T,B,H), xs (T,B,C))
//     -> dgates (T,B,4H) (gradient of the gate pre-activations), dh0, dc0 (B,H),
//        d_w_hh (H,4H), d_w_ih (C,4H), d_b (4H)
//     (single-threaded loop; the weight and bias gradients accumulated by the helper thread
//     meanwhile, see overlapped_dw)
// GRU (gates [r, z, n]; candidate n = tanh(xn + r * (W_hn h + b_hn))):
//   FdlGruFwd(xp (T,B,3H) aliased to acts, w_hh (H,3H), b_hh (3H), h0 (B,H))
//     -> acts (T,B,3H) = [r, z, n], ys (T,B,H), hns (T,B,H) = W_hn h_{t-1} + b_hn
//   FdlGruBwdDw(acts aliased to d_xp, w_hh^T (3H,H), h0, ys, hns, d_ys, dh_n, xs (T,B,C))
//     -> d_xp (T,B,3H) (gradient of x @ w_ih + b_ih), d_hh (T,B,3H) (of h @ w_hh + b_hh), dh0,
//        d_w_hh (H,3H), d_w_ih (C,3H), d_b_ih (3H), d_b_hh (3H)
//     (the weight and bias gradients overlapped with the loop, see overlapped_dw)

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// The build record (fdl/_ext/build.py): read from the file's bytes before it is ever loaded.
#ifndef FDL_BUILD_INFO
#define FDL_BUILD_INFO ""
#endif
extern "C" __attribute__((used)) const char fdl_build_info[] = "FDL_BUILD_INFO{" FDL_BUILD_INFO "}";

namespace ffi = xla::ffi;

// From libgomp, which libdnnl links.
extern "C" int omp_get_max_threads(void);
extern "C" void omp_set_num_threads(int);

namespace {

// dnnl_sgemm single-threaded for the duration of a loop (restored after): called from an XLA
// worker thread, its 2-thread OpenMP sgemm was slower than one thread, and its OpenMP workers
// keep spinning after each call, taking a core from whatever XLA runs next.
struct SingleThreadedGemm {
  int saved = omp_get_max_threads();
  SingleThreadedGemm() { omp_set_num_threads(1); }
  ~SingleThreadedGemm() { omp_set_num_threads(saved); }
};

// The backward's prologue. It overwrites the forward's gate activations with their gradients
// in place, in the output buffer (XLA usually aliases it with the input; otherwise the
// activations are copied there first), and keeps its running carries (dh, dc) in the outputs
// for h0 / c0, seeded with the incoming gradients of h_n / c_n.
float* in_place(const ffi::Buffer<ffi::F32>& in, ffi::ResultBuffer<ffi::F32>& out) {
  float* p = out->typed_data();
  if (p != in.typed_data()) std::memcpy(p, in.typed_data(), sizeof(float) * in.element_count());
  return p;
}

// ---------------------------------------------------------------------------------- 2 threads
//
// The LSTM loops can run on two threads: the caller (an XLA worker) and one helper thread owned
// by this library. Each thread owns half of the hidden units (all four gate columns of them):
// per step it runs its own single-threaded sgemm(s) and elementwise pass, and the two meet at
// one barrier per step. Waiting spins briefly and then sleeps on a futex, so a descheduled
// partner (a loaded machine) costs a context switch, not a spinning time slice, and nothing
// spins long after a call (unlike OpenMP's workers, which spin for ~10 ms).
//
// How long: ~60 us (kSpinCycles): with ~6 us a waiter often went to sleep and paid a wake-up
// per step (docs/results/sequence_lm.md).

constexpr uint64_t kSpinCycles = 200000;  // ~60 us

long futex(std::atomic<int>* addr, int op, int val) {
  return syscall(SYS_futex, reinterpret_cast<int*>(addr), op, val, nullptr, nullptr, 0);
}

// Wait until *a != old: spin, then sleep. `sleepers` counts sleeping waiters so the notifier
// only makes the syscall when someone sleeps (seq_cst on both sides: either the waiter sees the
// new value or the notifier sees the sleeper).
void wait_change(std::atomic<int>& a, int old, std::atomic<int>& sleepers) {
  const uint64_t t0 = __rdtsc();
  while (a.load(std::memory_order_acquire) == old) {
    if (__rdtsc() - t0 > kSpinCycles) {
      sleepers.fetch_add(1);
      while (a.load() == old) futex(&a, FUTEX_WAIT_PRIVATE, old);
      sleepers.fetch_sub(1);
      return;
    }
    _mm_pause();
  }
}

void notify(std::atomic<int>& a, std::atomic<int>& sleepers) {
  a.fetch_add(1);
  if (sleepers.load() > 0) futex(&a, FUTEX_WAKE_PRIVATE, INT_MAX);
}

class Team {
 public:
  static Team& get() {
    static Team* t = new Team();  // never destroyed: the helper outlives static teardown
    return *t;
  }
  // fn(0) on the caller, fn(1) on the helper; returns when both are done. One team call at a
  // time (a mutex); fn may call barrier().
  void run(const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    caller_cpu_ = sched_getcpu();
    notify(job_, job_sleepers_);
    fn(0);
    barrier();  // join
  }
  void barrier() {
    const int g = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1) == 1) {
      count_.store(0);
      notify(gen_, gen_sleepers_);
    } else {
      wait_change(gen_, g, gen_sleepers_);
    }
  }

 private:
  Team() { std::thread([this] { loop(); }).detach(); }
  void loop() {
    omp_set_num_threads(1);  // this thread's dnnl_sgemm calls: single-threaded
    int seen = 0;  // job_'s initial value (not a load: the first job may predate this thread)
    for (;;) {
      wait_change(job_, seen, job_sleepers_);
      seen = job_.load();
      avoid_cpu(caller_cpu_);
      (*fn_)(1);
      barrier();  // join
    }
  }
  // Keep the helper off the caller's CPU (its affinity: all of the process's CPUs but the one
  // the caller ran on at the start of the call; changed only when that CPU changes). Without
  // it, a helper woken by a futex was often placed on the caller's CPU (the scheduler's wake
  // affinity), the two time-sharing one core for a while (docs/results/sequence_lm.md).
  void avoid_cpu(int cpu) {
    if (cpu < 0 || cpu == avoided_) return;
    cpu_set_t all, set;
    if (sched_getaffinity(0, sizeof(all), &all) != 0) return;
    if (avoided_ < 0) all_ = all;
    set = all_;
    CPU_CLR(cpu, &set);
    if (CPU_COUNT(&set) == 0) return;
    if (sched_setaffinity(0, sizeof(set), &set) == 0) avoided_ = cpu;
  }
  int caller_cpu_ = -1, avoided_ = -1;
  cpu_set_t all_;
  std::mutex mu_;
  const std::function<void(int)>* fn_ = nullptr;
  std::atomic<int> job_{0}, job_sleepers_{0};
  std::atomic<int> gen_{0}, gen_sleepers_{0}, count_{0};
};

// C (M,N) = A (M,K; row stride lda) @ W (K,N), W packed once per call into oneDNN's blocked
// layout and the product run by a matmul primitive with a user scratchpad: unlike dnnl_sgemm,
// which allocates its packing buffer on every call (under fdl's single malloc arena the two
// threads of the 2-thread loop collided on that lock every step), a step allocates nothing
// large. One per thread (thread_local: a primitive runs on the thread that created it).
struct PackedGemm {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream strm{eng};
  int64_t M = -1, N = -1, K = -1, lda = -1;
  dnnl::matmul prim;
  dnnl::memory w_mem, src_mem, dst_mem, scr_mem;
  std::vector<uint8_t> scratch;
  std::vector<float> wbuf;

  void setup(int64_t m, int64_t n, int64_t k, int64_t ld) {
    if (m == M && n == N && k == K && ld == lda) return;
    using md = dnnl::memory::desc;
    using dt = dnnl::memory::data_type;
    md src({m, k}, dt::f32, dnnl::memory::dims{ld, 1});
    md w_any({k, n}, dt::f32, dnnl::memory::format_tag::any);
    md dst({m, n}, dt::f32, dnnl::memory::format_tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::primitive_desc pd(eng, src, w_any, dst, attr);
    prim = dnnl::matmul(pd);
    scratch.assign(pd.scratchpad_desc().get_size() + 64, 0);
    scr_mem = dnnl::memory(pd.scratchpad_desc(), eng, scratch.data());
    wbuf.assign(pd.weights_desc().get_size() / sizeof(float) + 16, 0.f);
    w_mem = dnnl::memory(pd.weights_desc(), eng, wbuf.data());
    src_mem = dnnl::memory(src, eng, DNNL_MEMORY_NONE);
    dst_mem = dnnl::memory(dst, eng, DNNL_MEMORY_NONE);
    M = m, N = n, K = k, lda = ld;
  }
  void pack(const float* w) {  // w (K,N) row-major, contiguous
    dnnl::memory user({{K, N}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab}, eng,
                      const_cast<float*>(w));
    dnnl::reorder(user, w_mem).execute(strm, user, w_mem);
  }
  void run(const float* a, float* c) {
    src_mem.set_data_handle(const_cast<float*>(a));
    dst_mem.set_data_handle(c);
    prim.execute(strm, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, w_mem},
                        {DNNL_ARG_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scr_mem}});
  }
};

PackedGemm& thread_gemm() {
  thread_local PackedGemm g;
  return g;
}

// Whether the LSTM forward loop runs on two threads (big enough to pay for a barrier per step).
bool use_two_threads(int64_t B, int64_t H) {
  return H % 2 == 0 && H >= 64 && B * H >= 4096;
}

// Eigen's float tanh (the rational approximation XLA:CPU also uses), written so the compiler
// vectorises the loops that call it.
inline float fast_tanh(float x) {
  const float kClamp = 7.90531110763549805f;
  x = std::min(kClamp, std::max(-kClamp, x));
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

inline float fast_sigmoid(float x) { return 0.5f * fast_tanh(0.5f * x) + 0.5f; }

#define FDL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// ---------------------------------------------------------------------------------- LSTM

// g (B,4H) holds pre-activations on entry, activations on exit; c, h (B,H) written; only the
// hidden units [j0, j1).
FDL_CLONES void lstm_fwd_step(int64_t B, int64_t H, int64_t j0, int64_t j1, float* __restrict g,
                              const float* __restrict c_prev, float* __restrict c,
                              float* __restrict h) {
  for (int64_t b = 0; b < B; ++b) {
    float* gi = g + b * 4 * H;
    float* gf = gi + H;
    float* gg = gi + 2 * H;
    float* go = gi + 3 * H;
    const float* cp = c_prev + b * H;
    float* cb = c + b * H;
    float* hb = h + b * H;
    for (int64_t j = j0; j < j1; ++j) {
      const float i = fast_sigmoid(gi[j]);
      const float f = fast_sigmoid(gf[j]);
      const float gv = fast_tanh(gg[j]);
      const float o = fast_sigmoid(go[j]);
      const float cv = f * cp[j] + i * gv;
      gi[j] = i;
      gf[j] = f;
      gg[j] = gv;
      go[j] = o;
      cb[j] = cv;
      hb[j] = o * fast_tanh(cv);
    }
  }
}

// a (B,4H) activations on entry, gate gradients on exit. dh (B,H): carried dh + dy (in),
// dc (B,H): carried dc in, dc * f out (the carry to step t-1). Only the hidden units [j0, j1).
FDL_CLONES void lstm_bwd_step(int64_t B, int64_t H, int64_t j0, int64_t j1, float* __restrict a,
                              const float* __restrict ct, const float* __restrict cp,
                              const float* __restrict dh, float* __restrict dc) {
  for (int64_t b = 0; b < B; ++b) {
    float* ai = a + b * 4 * H;
    float* af = ai + H;
    float* ag = ai + 2 * H;
    float* ao = ai + 3 * H;
    const float* ctb = ct + b * H;
    const float* cpb = cp + b * H;
    const float* dhb = dh + b * H;
    float* dcb = dc + b * H;
    for (int64_t j = j0; j < j1; ++j) {
      const float i = ai[j], f = af[j], g = ag[j], o = ao[j];
      const float tc = fast_tanh(ctb[j]);
      const float d_h = dhb[j];
      const float d_c = dcb[j] + d_h * o * (1.f - tc * tc);
      ai[j] = d_c * g * i * (1.f - i);
      af[j] = d_c * cpb[j] * f * (1.f - f);
      ag[j] = d_c * i * (1.f - g * g);
      ao[j] = d_h * tc * o * (1.f - o);
      dcb[j] = d_c * f;
    }
  }
}

FDL_CLONES void add_into(int64_t n, float* __restrict dst, const float* __restrict a,
                         const float* __restrict b) {
  for (int64_t k = 0; k < n; ++k) dst[k] = a[k] + b[k];
}

FDL_CLONES void acc_into(int64_t n, float* __restrict dst, const float* __restrict src) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

ffi::Error sgemm_error(dnnl_status_t st) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    "fdl rnn: dnnl_sgemm failed with status " + std::to_string(int(st)));
}

ffi::Error LstmFwdImpl(ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::ResultBuffer<ffi::F32> acts, ffi::ResultBuffer<ffi::F32> ys,
                       ffi::ResultBuffer<ffi::F32> cs) {
  auto d = xp.dimensions();
  if (d.size() != 3 || w.dimensions().size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl lstm fwd: bad ranks");
  const int64_t T = d[0], B = d[1], G = d[2], H = w.dimensions()[0];
  if (G != 4 * H || w.dimensions()[1] != G)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl lstm fwd: bad shapes");
  SingleThreadedGemm single;
  float* A = acts->typed_data();
  if (A != xp.typed_data()) std::memcpy(A, xp.typed_data(), sizeof(float) * T * B * G);
  float* Y = ys->typed_data();
  float* C = cs->typed_data();
  const float* W = w.typed_data();
  if (use_two_threads(B, H)) {
    // thread k: hidden units [j0, j0 + H/2), i.e. gate columns q*H + [j0, j0 + H/2), q < 4
    const int64_t Hh = H / 2;
    std::atomic<int> status{dnnl_success};
    Team::get().run([&](int k) {
      const int64_t j0 = k * Hh, N = 4 * Hh;
      // this thread's gate columns of w_hh, contiguous (H, 4*Hh), packed (PackedGemm); per
      // step one product into sk, added into the gate buffer's columns of this thread
      std::vector<float> wk(H * N), sk(B * N);
      for (int64_t r = 0; r < H; ++r)
        for (int64_t q = 0; q < 4; ++q)
          std::memcpy(wk.data() + r * N + q * Hh, W + r * G + q * H + j0, sizeof(float) * Hh);
      PackedGemm& pg = thread_gemm();
      try {
        pg.setup(B, N, H, H);
        pg.pack(wk.data());
      } catch (const dnnl::error&) {
        status = dnnl_runtime_error;
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* hp = t == 0 ? h0.typed_data() : Y + (t - 1) * B * H;
        const float* cp = t == 0 ? c0.typed_data() : C + (t - 1) * B * H;
        float* g = A + t * B * G;
        if (status == dnnl_success) {
          try {
            pg.run(hp, sk.data());
          } catch (const dnnl::error&) {
            status = dnnl_runtime_error;
          }
        }
        for (int64_t b = 0; b < B; ++b)
          for (int64_t q = 0; q < 4; ++q)
            acc_into(Hh, g + b * G + q * H + j0, sk.data() + b * N + q * Hh);
        lstm_fwd_step(B, H, j0, j0 + Hh, g, cp, C + t * B * H, Y + t * B * H);
        Team::get().barrier();  // h_t complete before step t + 1 reads it
      }
    });
    if (status != dnnl_success) return sgemm_error(dnnl_status_t(status.load()));
    return ffi::Error::Success();
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* hp = t == 0 ? h0.typed_data() : Y + (t - 1) * B * H;
    const float* cp = t == 0 ? c0.typed_data() : C + (t - 1) * B * H;
    float* g = A + t * B * G;
    // g += h_{t-1} @ W   (row-major: M=B, N=G, K=H)
    dnnl_status_t st = dnnl_sgemm('N', 'N', B, G, H, 1.f, hp, H, W, G, 1.f, g, G);
    if (st != dnnl_success) return sgemm_error(st);
    lstm_fwd_step(B, H, 0, H, g, cp, C + t * B * H, Y + t * B * H);
  }
  return ffi::Error::Success();
}

// The weight and bias gradients of a backward loop, accumulated over the steps the loop has
// finished, overlapped with the (single-threaded) reverse loop: `loop(step_done)` runs on the
// caller and calls step_done() after each step whose gate gradients are final (t = T-1 down to
// 0). The steps are cut into fixed chunks of K steps from the top (chunk c: steps
// [T - (c+1)K, T - cK), at most kMaxChunks chunks); each chunk is summed by `accumulate(lo, hi,
// acc)` into a buffer of its own, by the helper thread of Team as soon as its steps are done
// (chunks from the top, a progress counter, no barrier on the loop's path) or by the caller once
// its loop is over (chunks from the bottom, whatever the helper has not reached, so a helper
// that got no core costs no more than doing the work after the loop). The outputs are the chunk
// sums added in chunk order: which thread summed which chunk does not change a bit, so the
// gradients are the same run to run (bitwise resume holds for recurrent models).
struct DwOut {
  float* data;
  int64_t n;
};

constexpr int64_t kMaxChunks = 8;

template <size_t N, class Loop, class Accumulate>
void overlapped_dw(int64_t T, int64_t B, const std::array<DwOut, N>& outs, Loop&& loop,
                   Accumulate&& accumulate) {
  std::atomic<int> done{0}, sleepers{0};  // steps finished by the caller (from t = T - 1 down)
  std::mutex claim_mu;
  // steps per chunk: ~128 rows per sgemm, and no more than kMaxChunks chunk buffers
  const int64_t K = std::max<int64_t>({1, 128 / B, (T + kMaxChunks - 1) / kMaxChunks});
  const int64_t chunks = (T + K - 1) / K;
  int64_t total = 0;
  for (const DwOut& o : outs) total += o.n;
  thread_local std::vector<float> sums;  // chunk c's sums at c * total, the outputs back to back
  if (int64_t(sums.size()) < chunks * total) sums.resize(chunks * total);
  float* base = sums.data();
  int64_t next_top = 0, next_bottom = chunks - 1;  // unclaimed chunks: [next_top, next_bottom]
  auto sum_chunk = [&](int64_t c) {
    float* mine = base + c * total;
    std::memset(mine, 0, sizeof(float) * total);
    std::array<float*, N> acc{};
    int64_t off = 0;
    for (size_t i = 0; i < N; ++i) {
      acc[i] = mine + off;
      off += outs[i].n;
    }
    accumulate(std::max<int64_t>(0, T - (c + 1) * K), T - c * K - 1, acc);
  };
  auto step_done = [&] { notify(done, sleepers); };
  Team::get().run([&](int k) {
    if (k == 0) {
      loop(step_done);
      for (;;) {  // the chunks the helper has not claimed, from the bottom
        int64_t c;
        {
          std::lock_guard<std::mutex> lock(claim_mu);
          if (next_top > next_bottom) break;
          c = next_bottom--;
        }
        sum_chunk(c);
      }
      return;
    }
    omp_set_num_threads(1);
    for (int64_t c = 0;; ++c) {  // chunks from the top, each once its steps are done
      const int64_t need = std::min(T, (c + 1) * K);
      for (int n = done.load(std::memory_order_acquire); n < need;
           n = done.load(std::memory_order_acquire))
        wait_change(done, n, sleepers);
      {
        std::lock_guard<std::mutex> lock(claim_mu);
        if (c > next_bottom) break;  // the caller has taken it (and everything below)
        next_top = c + 1;
      }
      sum_chunk(c);
    }
  });
  for (size_t i = 0, off = 0; i < N; off += outs[i].n, ++i) {
    std::memcpy(outs[i].data, base + off, sizeof(float) * outs[i].n);
    for (int64_t c = 1; c < chunks; ++c) acc_into(outs[i].n, outs[i].data, base + c * total + off);
  }
}

// d_w += sum over steps [t_lo, t_hi] of h_{t-1}^T dg_t (h_{-1} = h0, h_t = Y[t]): (H, G)
dnnl_status_t acc_dw_hh(int64_t t_lo, int64_t t_hi, int64_t B, int64_t H, int64_t G,
                        const float* h0, const float* Y, const float* DG, float* dw) {
  dnnl_status_t st = dnnl_success;
  const int64_t a = std::max<int64_t>(t_lo, 1);
  if (a <= t_hi)
    st = dnnl_sgemm('T', 'N', H, G, (t_hi - a + 1) * B, 1.f, Y + (a - 1) * B * H, H,
                    DG + a * B * G, G, 1.f, dw, G);
  if (t_lo == 0 && st == dnnl_success)
    st = dnnl_sgemm('T', 'N', H, G, B, 1.f, h0, H, DG, G, 1.f, dw, G);
  return st;
}

// d_w += sum over steps [t_lo, t_hi] of x_t^T dg_t: (Cin, G); and d_b += the dg rows, if d_b
dnnl_status_t acc_dw_ih(int64_t t_lo, int64_t t_hi, int64_t B, int64_t Cin, int64_t G,
                        const float* X, const float* DG, float* dw, float* db) {
  const int64_t rows = (t_hi - t_lo + 1) * B;
  dnnl_status_t st = dnnl_sgemm('T', 'N', Cin, G, rows, 1.f, X + t_lo * B * Cin, Cin,
                                DG + t_lo * B * G, G, 1.f, dw, G);
  if (db != nullptr)
    for (int64_t r = 0; r < rows; ++r) acc_into(G, db, DG + (t_lo * B + r) * G);
  return st;
}

// The LSTM backward with the weight and bias gradients (d_w_hh = sum_t h_{t-1}^T dgates_t,
// d_w_ih = sum_t x_t^T dgates_t, d_b = sum of the dgates rows) computed in the same call,
// overlapped with the reverse loop (overlapped_dw).
ffi::Error LstmBwdDwImpl(ffi::Buffer<ffi::F32> acts_in, ffi::Buffer<ffi::F32> w_t,
                         ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> cs,
                         ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dh_n,
                         ffi::Buffer<ffi::F32> dc_n, ffi::Buffer<ffi::F32> h0,
                         ffi::Buffer<ffi::F32> ys, ffi::Buffer<ffi::F32> xs,
                         ffi::ResultBuffer<ffi::F32> dgates, ffi::ResultBuffer<ffi::F32> dh0,
                         ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> d_w_hh,
                         ffi::ResultBuffer<ffi::F32> d_w_ih, ffi::ResultBuffer<ffi::F32> d_b) {
  auto d = acts_in.dimensions();
  const int64_t T = d[0], B = d[1], G = d[2], H = w_t.dimensions()[1];
  if (G != 4 * H || w_t.dimensions()[0] != G || xs.dimensions().size() != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl lstm bwd: bad shapes");
  const int64_t Cin = xs.dimensions()[2];
  const float* X = xs.typed_data();
  SingleThreadedGemm single;
  float* A = in_place(acts_in, dgates);
  const float* WT = w_t.typed_data();
  const float* C = cs.typed_data();
  const float* DY = dys.typed_data();
  const float* Y = ys.typed_data();
  float* dh = in_place(dh_n, dh0);
  float* dc = in_place(dc_n, dc0);
  std::vector<float> dh_tot(B * H);
  std::atomic<int> status{dnnl_success};
  const std::array<DwOut, 3> outs{DwOut{d_w_hh->typed_data(), H * G},
                                  DwOut{d_w_ih->typed_data(), Cin * G},
                                  DwOut{d_b->typed_data(), G}};
  overlapped_dw(
      T, B, outs,
      [&](auto&& step_done) {
        for (int64_t t = T - 1; t >= 0; --t) {
          add_into(B * H, dh_tot.data(), dh, DY + t * B * H);
          const float* cp = t == 0 ? c0.typed_data() : C + (t - 1) * B * H;
          float* g = A + t * B * G;
          lstm_bwd_step(B, H, 0, H, g, C + t * B * H, cp, dh_tot.data(), dc);
          step_done();  // dgates_t is final
          dnnl_status_t st = dnnl_sgemm('N', 'N', B, H, G, 1.f, g, G, WT, H, 0.f, dh, H);
          if (st != dnnl_success) status = st;
        }
      },
      [&](int64_t lo, int64_t hi, const std::array<float*, 3>& acc) {
        dnnl_status_t st = acc_dw_hh(lo, hi, B, H, G, h0.typed_data(), Y, A, acc[0]);
        if (st != dnnl_success) status = st;
        st = acc_dw_ih(lo, hi, B, Cin, G, X, A, acc[1], acc[2]);
        if (st != dnnl_success) status = st;
      });
  if (status != dnnl_success) return sgemm_error(dnnl_status_t(status.load()));
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------- GRU

// x (B,3H) input pre-activations in, [r, z, n] out; hh (B,3H) = h W_hh + b_hh.
FDL_CLONES void gru_fwd_step(int64_t B, int64_t H, float* __restrict x,
                             const float* __restrict hh, const float* __restrict h_prev,
                             float* __restrict h, float* __restrict hn) {
  for (int64_t b = 0; b < B; ++b) {
    float* xr = x + b * 3 * H;
    float* xz = xr + H;
    float* xn = xr + 2 * H;
    const float* hr = hh + b * 3 * H;
    const float* hz = hr + H;
    const float* hnn = hr + 2 * H;
    const float* hp = h_prev + b * H;
    float* hb = h + b * H;
    float* hnb = hn + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float r = fast_sigmoid(xr[j] + hr[j]);
      const float z = fast_sigmoid(xz[j] + hz[j]);
      const float n = fast_tanh(xn[j] + r * hnn[j]);
      xr[j] = r;
      xz[j] = z;
      xn[j] = n;
      hnb[j] = hnn[j];
      hb[j] = n + z * (hp[j] - n);
    }
  }
}

// a (B,3H) [r, z, n] in, d_xp out; dhh (B,3H) out; dh (B,H) total dh in; dz_carry out = dh*z.
FDL_CLONES void gru_bwd_step(int64_t B, int64_t H, float* __restrict a,
                             float* __restrict dhh, const float* __restrict hn,
                             const float* __restrict hp, const float* __restrict dh,
                             float* __restrict dcarry) {
  for (int64_t b = 0; b < B; ++b) {
    float* ar = a + b * 3 * H;
    float* az = ar + H;
    float* an = ar + 2 * H;
    float* qr = dhh + b * 3 * H;
    float* qz = qr + H;
    float* qn = qr + 2 * H;
    const float* hnb = hn + b * H;
    const float* hpb = hp + b * H;
    const float* dhb = dh + b * H;
    float* dcb = dcarry + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float r = ar[j], z = az[j], n = an[j], d = dhb[j];
      const float dan = d * (1.f - z) * (1.f - n * n);
      const float dar = dan * hnb[j] * r * (1.f - r);
      const float daz = d * (hpb[j] - n) * z * (1.f - z);
      ar[j] = dar;
      az[j] = daz;
      an[j] = dan;
      qr[j] = dar;
      qz[j] = daz;
      qn[j] = dan * r;
      dcb[j] = d * z;
    }
  }
}

ffi::Error GruFwdImpl(ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> b_hh, ffi::Buffer<ffi::F32> h0,
                      ffi::ResultBuffer<ffi::F32> acts, ffi::ResultBuffer<ffi::F32> ys,
                      ffi::ResultBuffer<ffi::F32> hns) {
  auto d = xp.dimensions();
  if (d.size() != 3 || w.dimensions().size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl gru fwd: bad ranks");
  const int64_t T = d[0], B = d[1], G = d[2], H = w.dimensions()[0];
  if (G != 3 * H || w.dimensions()[1] != G)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl gru fwd: bad shapes");
  SingleThreadedGemm single;
  float* A = acts->typed_data();
  if (A != xp.typed_data()) std::memcpy(A, xp.typed_data(), sizeof(float) * T * B * G);
  float* Y = ys->typed_data();
  float* HN = hns->typed_data();
  const float* W = w.typed_data();
  const float* bias = b_hh.typed_data();
  std::vector<float> hh(B * G);
  for (int64_t t = 0; t < T; ++t) {
    const float* hp = t == 0 ? h0.typed_data() : Y + (t - 1) * B * H;
    for (int64_t b = 0; b < B; ++b) std::memcpy(hh.data() + b * G, bias, sizeof(float) * G);
    dnnl_status_t st = dnnl_sgemm('N', 'N', B, G, H, 1.f, hp, H, W, G, 1.f, hh.data(), G);
    if (st != dnnl_success) return sgemm_error(st);
    gru_fwd_step(B, H, A + t * B * G, hh.data(), hp, Y + t * B * H, HN + t * B * H);
  }
  return ffi::Error::Success();
}

// The GRU's reverse loop (GruBwdDwImpl): for t = T-1 .. 0 the gate
// gradients d_xp_t (in A, in place) and d_hh_t (Q), then step_done(), then
// dh_{t-1} = dh * z + d_hh_t @ W^T. Returns the first sgemm error (the loop still finishes, so
// a helper thread waiting on step_done is never left behind).
template <typename StepDone>
dnnl_status_t gru_reverse_loop(int64_t T, int64_t B, int64_t H, float* A, float* Q,
                               const float* WT, const float* HN, const float* Y,
                               const float* h0, const float* DY, float* dh,
                               StepDone&& step_done) {
  const int64_t G = 3 * H;
  std::vector<float> dh_tot(B * H);
  dnnl_status_t status = dnnl_success;
  for (int64_t t = T - 1; t >= 0; --t) {
    add_into(B * H, dh_tot.data(), dh, DY + t * B * H);
    const float* hp = t == 0 ? h0 : Y + (t - 1) * B * H;
    float* q = Q + t * B * G;
    gru_bwd_step(B, H, A + t * B * G, q, HN + t * B * H, hp, dh_tot.data(), dh);
    step_done();  // d_xp_t and d_hh_t are final
    dnnl_status_t st = dnnl_sgemm('N', 'N', B, H, G, 1.f, q, G, WT, H, 1.f, dh, H);
    if (st != dnnl_success && status == dnnl_success) status = st;
  }
  return status;
}

// The GRU backward with the weight and bias gradients computed in the same call, overlapped
// with the reverse loop (overlapped_dw): d_w_hh = sum_t h_{t-1}^T d_hh_t, d_b_hh = the d_hh
// rows (d_hh: gradient of h @ w_hh + b_hh, whose candidate block is d_an * r because b_hn sits
// inside r * (W_hn h + b_hn)); d_w_ih = sum_t x_t^T d_xp_t, d_b_ih = the d_xp rows.
ffi::Error GruBwdDwImpl(ffi::Buffer<ffi::F32> acts_in, ffi::Buffer<ffi::F32> w_t,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> ys,
                        ffi::Buffer<ffi::F32> hns, ffi::Buffer<ffi::F32> dys,
                        ffi::Buffer<ffi::F32> dh_n, ffi::Buffer<ffi::F32> xs,
                        ffi::ResultBuffer<ffi::F32> d_xp, ffi::ResultBuffer<ffi::F32> d_hh,
                        ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> d_w_hh,
                        ffi::ResultBuffer<ffi::F32> d_w_ih, ffi::ResultBuffer<ffi::F32> d_b_ih,
                        ffi::ResultBuffer<ffi::F32> d_b_hh) {
  auto d = acts_in.dimensions();
  const int64_t T = d[0], B = d[1], G = d[2], H = w_t.dimensions()[1];
  if (G != 3 * H || w_t.dimensions()[0] != G || xs.dimensions().size() != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fdl gru bwd: bad shapes");
  const int64_t Cin = xs.dimensions()[2];
  const float* X = xs.typed_data();
  SingleThreadedGemm single;
  float* A = in_place(acts_in, d_xp);
  float* Q = d_hh->typed_data();
  const float* WT = w_t.typed_data();
  const float* Y = ys.typed_data();
  const float* HN = hns.typed_data();
  const float* DY = dys.typed_data();
  float* dh = in_place(dh_n, dh0);
  std::atomic<int> status{dnnl_success};
  const std::array<DwOut, 4> outs{
      DwOut{d_w_hh->typed_data(), H * G}, DwOut{d_w_ih->typed_data(), Cin * G},
      DwOut{d_b_ih->typed_data(), G}, DwOut{d_b_hh->typed_data(), G}};
  overlapped_dw(
      T, B, outs,
      [&](auto&& step_done) {
        dnnl_status_t st =
            gru_reverse_loop(T, B, H, A, Q, WT, HN, Y, h0.typed_data(), DY, dh, step_done);
        if (st != dnnl_success) status = st;
      },
      [&](int64_t lo, int64_t hi, const std::array<float*, 4>& acc) {
        dnnl_status_t st = acc_dw_hh(lo, hi, B, H, G, h0.typed_data(), Y, Q, acc[0]);
        if (st != dnnl_success) status = st;
        st = acc_dw_ih(lo, hi, B, Cin, G, X, A, acc[1], acc[2]);
        if (st != dnnl_success) status = st;
        const int64_t rows = (hi - lo + 1) * B;
        for (int64_t r = 0; r < rows; ++r) acc_into(G, acc[3], Q + (lo * B + r) * G);
      });
  if (status != dnnl_success) return sgemm_error(dnnl_status_t(status.load()));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlLstmFwd, LstmFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlLstmBwdDw, LstmBwdDwImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlGruFwd, GruFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FdlGruBwdDw, GruBwdDwImpl,
                              ffi::Ffi::Bind()
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
