// Fused DC-ASGD update on the CPU: one pass over g, w, w_bak (ms for -a, v for momentum); the
// per-element math (dc_step) is in dc_update.h, shared with dc_update.cu.
//
// One entry point, hpctrain_dc_step, writes any of: d (the `atomic` store accumulates it),
// w + d (the `locked` store's new shard) and a second copy of w + d (the worker's own model).
// Every output may be the very same buffer as any input (in-place use): each element is read
// completely before it is written and no element depends on another, so `omp simd` (which
// promises no dependence between iterations) is exact; pointers are not `restrict` for that
// reason. Partially overlapping buffers are not allowed (hpctrain.kernels rejects them).
// Plain C ABI, no Python or torch headers; loaded with ctypes.

#include <cstdint>

#include "dc_update.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;

using hpctrain_dc::Buffers;
using hpctrain_dc::dc_step;
using hpctrain_dc::Hyper;

// One pass; flags: variant (Adaptive, Momentum) and which outputs exist (D: d, W/W2: w + d).
template <bool Adaptive, bool Momentum, bool D, bool W, bool W2>
void fused(const Buffers b, int64_t n, const Hyper h, [[maybe_unused]] int threads) {
  float* d_out = b.d_out;
  float* w_out = b.w_out;
  float* w_out2 = b.w_out2;
  const float* w = b.w;
  const float* g = b.g;
  const float* wb = b.wb;
  float* ms = b.ms;
  float* v = b.v;
#pragma omp parallel for simd schedule(static) num_threads(threads) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float wi = w[i];
    const float d = dc_step<Adaptive, Momentum>(wi, g[i], wb[i], Adaptive ? ms + i : nullptr,
                                                Momentum ? v + i : nullptr, h);
    if (D) d_out[i] = d;
    if (W) w_out[i] = wi + d;
    if (W2) w_out2[i] = wi + d;
  }
}

// Turns the run-time choices (which pointers are set) into template flags, one at a time.
template <bool... Flags>
void dispatch(const Buffers& b, int64_t n, const Hyper& h, int threads) {
  constexpr size_t k = sizeof...(Flags);
  if constexpr (k == 5) {
    fused<Flags...>(b, n, h, threads);
  } else {
    const void* const which[] = {b.ms, b.v, b.d_out, b.w_out, b.w_out2};
    if (which[k])
      dispatch<Flags..., true>(b, n, h, threads);
    else
      dispatch<Flags..., false>(b, n, h, threads);
  }
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

// One fused pass. Outputs, each optional (NULL: not written): d_out = d, w_out = w + d,
// w_out2 = w + d. ms == NULL: constant lambda (DC-ASGD-c, or ASGD with lam 0); v == NULL: no
// momentum. threads <= 0: OpenMP's default (OMP_NUM_THREADS).
void hpctrain_dc_step(float* d_out, float* w_out, float* w_out2, const float* w, const float* g,
                      const float* w_bak, float* ms, float* v, int64_t n, float lr, float lam,
                      float ms_decay, float weight_decay, float momentum, int threads) {
  const Buffers b{d_out, w_out, w_out2, w, g, w_bak, ms, v};
  dispatch<>(b, n, Hyper{lr, lam, ms_decay, weight_decay, momentum}, resolve_threads(threads));
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
