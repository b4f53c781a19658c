// The per-element DC-ASGD step, shared by dc_update.cpp (CPU) and dc_update.cu (CUDA), which
// add the loops over the buffers.
//
//   g'    = g + wd * w_bak                                 (weight decay at the model g was computed at)
//   s     = m * ms + (1 - m) * g'^2,  lam_t = lam / sqrt(s + 1e-7)   (DC-ASGD-a; -c: lam_t = lam)
//   ms    = min(s, FLT_MAX)                                (an overflow to inf would never decay)
//   d     = -lr * (g' + lam_t * g'^2 * (w - w_bak))         (ASGD: lam = 0)
//   v     = momentum * v + d,  d = v                         (only with a velocity buffer v)

#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define HPCTRAIN_HD __host__ __device__ __forceinline__
#else
#define HPCTRAIN_HD inline
#endif

namespace hpctrain_dc {

struct Hyper {
  float lr, lam, decay, wd, momentum;
};

// Outputs (each may be NULL: not written), inputs, and the optional state ms and v.
struct Buffers {
  float* d_out;
  float* w_out;
  float* w_out2;
  const float* w;
  const float* g;
  const float* wb;
  float* ms;
  float* v;
};

// The step d for one element; updates *ms when Adaptive and *v when Momentum.
template <bool Adaptive, bool Momentum>
HPCTRAIN_HD float dc_step(float w, float g, float wb, float* ms, float* v, const Hyper& h) {
  const float gd = g + h.wd * wb;
  const float gg = gd * gd;
  float lam = h.lam;
  if (Adaptive) {
    const float s = h.decay * *ms + (1.0f - h.decay) * gg;
    // Above |g'| = 1.8e19 (finite, so no NaN guard stops it) g'^2 and so s overflow to inf, and
    // inf never decays: lam_t would be 0 for this element for the rest of the run (plain ASGD),
    // saved in checkpoints and averaged into every worker's ms on a resize. The true value,
    // (1 - m) * g'^2 or more, is of the order of FLT_MAX: store that, and ms decays back as it
    // should (an inf ms read from a checkpoint heals too). A comparison, not fminf, so that a
    // NaN stays a NaN. Only the stored value is clamped (this push's lam_t, from inf, is 0):
    // clamping s before the division stops GCC 12 vectorising the loop (4x slower).
    *ms = s > FLT_MAX ? FLT_MAX : s;
    lam = h.lam / sqrtf(s + 1e-7f);
  }
  // lam_t * g'^2 * (w - w_bak) as (lam_t * g') * (g' * (w - w_bak)): g'^2 alone overflows
  // above |g'| = 1.8e19, and 0 * inf (lam_t = 0 in ASGD, w == w_bak) would be NaN.
  const float comp = (lam * gd) * (gd * (w - wb));
  float d = -h.lr * (gd + comp);
  if (Momentum) {
    d += h.momentum * *v;
    *v = d;
  }
  return d;
}

}  // namespace hpctrain_dc
