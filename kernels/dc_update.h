// The per-element DC-ASGD step, shared by dc_update.cpp (CPU) and dc_update.cu (CUDA), which
// add the loops over the buffers.
//
//   g'    = g + wd * w_bak                                 (weight decay at the model g was computed at)
//   ms    = m * ms + (1 - m) * g'^2,  lam_t = lam / sqrt(ms + 1e-7)   (DC-ASGD-a; -c: lam_t = lam)
//   d     = -lr * (g' + lam_t * g'^2 * (w - w_bak))         (ASGD: lam = 0)
//   v     = momentum * v + d,  d = v                         (only with a velocity buffer v)

#pragma once

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
    *ms = s;
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
