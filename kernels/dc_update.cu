// Fused DC-ASGD update on CUDA devices: the same math and entry points as dc_update.cpp.
//
//   g'    = g + wd * w_bak
//   ms    = m * ms + (1 - m) * g'^2,  lam_t = lam / sqrt(ms + 1e-7)   (DC-ASGD-a; -c: lam_t = lam)
//   d     = -lr * (g' + lam_t * g'^2 * (w - w_bak))         (ASGD: lam = 0)
//
// hpctrain_dc_apply_cuda writes w + d; hpctrain_dc_delta_cuda writes d and optionally w + d.
// Grid-stride loops; when every pointer is 16-byte aligned the body moves float4 vectors and a
// scalar tail finishes the last n % 4 elements. Outputs may be the same buffers as inputs (each
// thread reads its elements before writing them), so pointers are not __restrict__.
// Launchers take device pointers and a stream, return the cudaError_t of the launch, and need
// no torch headers.

#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

struct Hyper {
  float lr, lam, decay, wd;
};

template <bool Adaptive>
__device__ __forceinline__ float dc_step(float w, float g, float wb, float* ms, const Hyper& h) {
  const float gd = g + h.wd * wb;
  const float gg = gd * gd;
  float lam = h.lam;
  if (Adaptive) {
    const float s = h.decay * *ms + (1.0f - h.decay) * gg;
    *ms = s;
    lam = h.lam / sqrtf(s + 1e-7f);
  }
  return -h.lr * (gd + lam * gg * (w - wb));
}

// One element: d_out (if Delta) gets d, w_new (if WithW) gets w + d.
template <bool Adaptive, bool Delta, bool WithW>
__device__ __forceinline__ void element(float* d_out, float* w_new, const float* w, const float* g,
                                        const float* wb, float* ms, int64_t i, const Hyper& h) {
  const float wi = w[i];
  const float d = dc_step<Adaptive>(wi, g[i], wb[i], Adaptive ? ms + i : nullptr, h);
  if (Delta) d_out[i] = d;
  if (WithW) w_new[i] = wi + d;
}

template <bool Adaptive, bool Delta, bool WithW>
__device__ __forceinline__ void lanes(float4& d4, float4& wn4, const float4& w4, const float4& g4,
                                      const float4& b4, float4* m4, const Hyper& h) {
  float* m = Adaptive ? reinterpret_cast<float*>(m4) : nullptr;
  const float d0 = dc_step<Adaptive>(w4.x, g4.x, b4.x, Adaptive ? m + 0 : nullptr, h);
  const float d1 = dc_step<Adaptive>(w4.y, g4.y, b4.y, Adaptive ? m + 1 : nullptr, h);
  const float d2 = dc_step<Adaptive>(w4.z, g4.z, b4.z, Adaptive ? m + 2 : nullptr, h);
  const float d3 = dc_step<Adaptive>(w4.w, g4.w, b4.w, Adaptive ? m + 3 : nullptr, h);
  d4 = make_float4(d0, d1, d2, d3);
  wn4 = make_float4(w4.x + d0, w4.y + d1, w4.z + d2, w4.w + d3);
}

template <bool Adaptive, bool Delta, bool WithW>
__global__ void dc_vec4(float* d_out, float* w_new, const float* w, const float* g,
                        const float* wb, float* ms, int64_t n, Hyper h) {
  const int64_t n4 = n / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < n4; i += stride) {
    const float4 w4 = reinterpret_cast<const float4*>(w)[i];
    const float4 g4 = reinterpret_cast<const float4*>(g)[i];
    const float4 b4 = reinterpret_cast<const float4*>(wb)[i];
    float4 m4;
    if (Adaptive) m4 = reinterpret_cast<const float4*>(ms)[i];
    float4 d4, wn4;
    lanes<Adaptive, Delta, WithW>(d4, wn4, w4, g4, b4, &m4, h);
    if (Adaptive) reinterpret_cast<float4*>(ms)[i] = m4;
    if (Delta) reinterpret_cast<float4*>(d_out)[i] = d4;
    if (WithW) reinterpret_cast<float4*>(w_new)[i] = wn4;
  }
  // Scalar tail: the last n % 4 elements.
  for (int64_t i = 4 * n4 + first; i < n; i += stride)
    element<Adaptive, Delta, WithW>(d_out, w_new, w, g, wb, ms, i, h);
}

template <bool Adaptive, bool Delta, bool WithW>
__global__ void dc_scalar(float* d_out, float* w_new, const float* w, const float* g,
                          const float* wb, float* ms, int64_t n, Hyper h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    element<Adaptive, Delta, WithW>(d_out, w_new, w, g, wb, ms, i, h);
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Enough blocks to fill the device a few times over; the grid-stride loop covers the rest.
cudaError_t grid_for(int64_t work, int* blocks) {
  static int sms[kMaxDevices] = {0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < kMaxDevices && sms[dev] == 0) {
    err = cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
  }
  const int64_t cap = static_cast<int64_t>(dev < kMaxDevices ? sms[dev] : 132) * 8;
  const int64_t want = (work + kThreads - 1) / kThreads;
  *blocks = static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
  return cudaSuccess;
}

template <bool Adaptive, bool Delta, bool WithW>
cudaError_t launch(float* d_out, float* w_new, const float* w, const float* g, const float* wb,
                   float* ms, int64_t n, Hyper h, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned16(d_out) && aligned16(w_new) && aligned16(w) && aligned16(g) &&
                   aligned16(wb) && aligned16(ms);
  int blocks = 0;
  cudaError_t err = grid_for(vec ? (n + 3) / 4 : n, &blocks);
  if (err != cudaSuccess) return err;
  if (vec)
    dc_vec4<Adaptive, Delta, WithW><<<blocks, kThreads, 0, stream>>>(d_out, w_new, w, g, wb, ms,
                                                                     n, h);
  else
    dc_scalar<Adaptive, Delta, WithW><<<blocks, kThreads, 0, stream>>>(d_out, w_new, w, g, wb,
                                                                       ms, n, h);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

// w_new = w + d on device pointers. ms == NULL selects the constant-lambda variant.
int hpctrain_dc_apply_cuda(float* w_new, const float* w, const float* g, const float* w_bak,
                           float* ms, int64_t n, float lr, float lam, float ms_decay,
                           float weight_decay, cudaStream_t stream) {
  const Hyper h{lr, lam, ms_decay, weight_decay};
  if (ms) return launch<true, false, true>(nullptr, w_new, w, g, w_bak, ms, n, h, stream);
  return launch<false, false, true>(nullptr, w_new, w, g, w_bak, ms, n, h, stream);
}

// d_out = d and, when w_new != NULL, w_new = w + d, on device pointers.
int hpctrain_dc_delta_cuda(float* d_out, float* w_new, const float* w, const float* g,
                           const float* w_bak, float* ms, int64_t n, float lr, float lam,
                           float ms_decay, float weight_decay, cudaStream_t stream) {
  const Hyper h{lr, lam, ms_decay, weight_decay};
  if (ms && w_new) return launch<true, true, true>(d_out, w_new, w, g, w_bak, ms, n, h, stream);
  if (ms) return launch<true, true, false>(d_out, nullptr, w, g, w_bak, ms, n, h, stream);
  if (w_new) return launch<false, true, true>(d_out, w_new, w, g, w_bak, ms, n, h, stream);
  return launch<false, true, false>(d_out, nullptr, w, g, w_bak, ms, n, h, stream);
}

// The message for an error code the launchers returned.
const char* hpctrain_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // extern "C"
