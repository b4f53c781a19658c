// Fused DC-ASGD update on the CPU: one pass over g, w, w_bak (ms for -a, v for momentum).
//
//   g'    = g + wd * w_bak                                 (weight decay at the model g was computed at)
//   ms    = m * ms + (1 - m) * g'^2,  lam_t = lam / sqrt(ms + 1e-7)   (DC-ASGD-a; -c: lam_t = lam)
//   d     = -lr * (g' + lam_t * g'^2 * (w - w_bak))         (ASGD: lam = 0)
//   v     = momentum * v + d,  d = v                         (only with a velocity buffer v)
//
// Two entry points share that math: hpctrain_dc_apply writes w + d (the `locked` store's new
// shard), hpctrain_dc_delta writes d and optionally w + d (the `atomic` store accumulates d).
// Every output may be the very same buffer as any input (in-place use): each element is read
// completely before it is written and no element depends on another, so `omp simd` (which
// promises no dependence between iterations) is exact; pointers are not `restrict` for that
// reason. Partially overlapping buffers are not allowed (hpctrain.kernels rejects them).
// Plain C ABI, no Python or torch headers; loaded with ctypes.

#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;

struct Hyper {
  float lr, lam, decay, wd, momentum;
};

// The step d for one element; updates *ms when Adaptive and *v when Momentum.
template <bool Adaptive, bool Momentum>
inline float dc_step(float w, float g, float wb, float* ms, float* v, const Hyper& h) {
  const float gd = g + h.wd * wb;
  const float gg = gd * gd;
  float lam = h.lam;
  if (Adaptive) {
    const float s = h.decay * *ms + (1.0f - h.decay) * gg;
    *ms = s;
    lam = h.lam / std::sqrt(s + 1e-7f);
  }
  float d = -h.lr * (gd + lam * gg * (w - wb));
  if (Momentum) {
    d += h.momentum * *v;
    *v = d;
  }
  return d;
}

// One pass: d_out (if Delta) gets d, w_new (if WithW) gets w + d.
template <bool Adaptive, bool Momentum, bool Delta, bool WithW>
void fused(float* d_out, float* w_new, const float* w, const float* g, const float* wb, float* ms,
           float* v, int64_t n, const Hyper h, [[maybe_unused]] int threads) {
#pragma omp parallel for simd schedule(static) num_threads(threads) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float wi = w[i];
    const float d = dc_step<Adaptive, Momentum>(wi, g[i], wb[i], Adaptive ? ms + i : nullptr,
                                                Momentum ? v + i : nullptr, h);
    if (Delta) d_out[i] = d;
    if (WithW) w_new[i] = wi + d;
  }
}

template <bool Delta, bool WithW>
void dispatch(float* d_out, float* w_new, const float* w, const float* g, const float* wb,
              float* ms, float* v, int64_t n, const Hyper& h, int threads) {
  if (ms && v)
    fused<true, true, Delta, WithW>(d_out, w_new, w, g, wb, ms, v, n, h, threads);
  else if (ms)
    fused<true, false, Delta, WithW>(d_out, w_new, w, g, wb, ms, v, n, h, threads);
  else if (v)
    fused<false, true, Delta, WithW>(d_out, w_new, w, g, wb, ms, v, n, h, threads);
  else
    fused<false, false, Delta, WithW>(d_out, w_new, w, g, wb, ms, v, n, h, threads);
}

int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

}  // namespace

extern "C" {

// w_new = w + d. ms == NULL: constant lambda (DC-ASGD-c, or ASGD with lam 0); v == NULL: no
// momentum. threads <= 0: OpenMP's default (OMP_NUM_THREADS).
void hpctrain_dc_apply(float* w_new, const float* w, const float* g, const float* w_bak,
                       float* ms, float* v, int64_t n, float lr, float lam, float ms_decay,
                       float weight_decay, float momentum, int threads) {
  const Hyper h{lr, lam, ms_decay, weight_decay, momentum};
  dispatch<false, true>(nullptr, w_new, w, g, w_bak, ms, v, n, h, resolve_threads(threads));
}

// d_out = d and, when w_new != NULL, w_new = w + d. ms, v as for hpctrain_dc_apply.
void hpctrain_dc_delta(float* d_out, float* w_new, const float* w, const float* g,
                       const float* w_bak, float* ms, float* v, int64_t n, float lr, float lam,
                       float ms_decay, float weight_decay, float momentum, int threads) {
  const Hyper h{lr, lam, ms_decay, weight_decay, momentum};
  const int t = resolve_threads(threads);
  if (w_new)
    dispatch<true, true>(d_out, w_new, w, g, w_bak, ms, v, n, h, t);
  else
    dispatch<true, false>(d_out, w_new, w, g, w_bak, ms, v, n, h, t);
}

// 1 when built with OpenMP, so callers can report what they measured.
int hpctrain_dc_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
