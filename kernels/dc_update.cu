// Fused DC-ASGD update on CUDA devices: the same math (dc_step in dc_update.h) and outputs as
// dc_update.cpp.
//
// hpctrain_dc_step_cuda writes any of d, w + d and a second copy of w + d.
// Grid-stride loops; when every pointer is 16-byte aligned the body moves float4 vectors and a
// scalar tail finishes the last n % 4 elements. Outputs may be the same buffers as inputs (each
// thread reads its elements before writing them), so pointers are not __restrict__.
// The launcher takes device pointers and a stream, returns the cudaError_t of the launch, and
// needs no torch headers.

#include <cstdint>
#include <cuda_runtime.h>

#include "dc_update.h"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

using hpctrain_dc::Buffers;
using hpctrain_dc::dc_step;
using hpctrain_dc::Hyper;

// Compile-time choice of variant (Adaptive, Momentum) and outputs (D: d, W/W2: w + d).
template <bool Adaptive_, bool Momentum_, bool D_, bool W_, bool W2_>
struct Variant {
  static constexpr bool Adaptive = Adaptive_, Momentum = Momentum_, D = D_, W = W_, W2 = W2_;
};

template <class V>
__device__ __forceinline__ void element(const Buffers& b, int64_t i, const Hyper& h) {
  const float wi = b.w[i];
  const float d = dc_step<V::Adaptive, V::Momentum>(wi, b.g[i], b.wb[i],
                                                    V::Adaptive ? b.ms + i : nullptr,
                                                    V::Momentum ? b.v + i : nullptr, h);
  if (V::D) b.d_out[i] = d;
  if (V::W) b.w_out[i] = wi + d;
  if (V::W2) b.w_out2[i] = wi + d;
}

__device__ __forceinline__ float& lane(float4& x, int k) {
  return k == 0 ? x.x : k == 1 ? x.y : k == 2 ? x.z : x.w;
}

template <class V>
__global__ void dc_vec4(Buffers b, int64_t n, Hyper h) {
  const int64_t n4 = n / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < n4; i += stride) {
    float4 w4 = reinterpret_cast<const float4*>(b.w)[i];
    float4 g4 = reinterpret_cast<const float4*>(b.g)[i];
    float4 b4 = reinterpret_cast<const float4*>(b.wb)[i];
    float4 m4 = make_float4(0.f, 0.f, 0.f, 0.f), v4 = m4, d4, wn4;
    if (V::Adaptive) m4 = reinterpret_cast<const float4*>(b.ms)[i];
    if (V::Momentum) v4 = reinterpret_cast<const float4*>(b.v)[i];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float d = dc_step<V::Adaptive, V::Momentum>(lane(w4, k), lane(g4, k), lane(b4, k),
                                                        &lane(m4, k), &lane(v4, k), h);
      lane(d4, k) = d;
      lane(wn4, k) = lane(w4, k) + d;
    }
    if (V::Adaptive) reinterpret_cast<float4*>(b.ms)[i] = m4;
    if (V::Momentum) reinterpret_cast<float4*>(b.v)[i] = v4;
    if (V::D) reinterpret_cast<float4*>(b.d_out)[i] = d4;
    if (V::W) reinterpret_cast<float4*>(b.w_out)[i] = wn4;
    if (V::W2) reinterpret_cast<float4*>(b.w_out2)[i] = wn4;
  }
  // Scalar tail: the last n % 4 elements.
  for (int64_t i = 4 * n4 + first; i < n; i += stride) element<V>(b, i, h);
}

template <class V>
__global__ void dc_scalar(Buffers b, int64_t n, Hyper h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    element<V>(b, i, h);
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

template <class V>
cudaError_t launch(const Buffers& b, int64_t n, const Hyper& h, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned16(b.d_out) && aligned16(b.w_out) && aligned16(b.w_out2) &&
                   aligned16(b.w) && aligned16(b.g) && aligned16(b.wb) && aligned16(b.ms) &&
                   aligned16(b.v);
  int blocks = 0;
  cudaError_t err = grid_for(vec ? (n + 3) / 4 : n, &blocks);
  if (err != cudaSuccess) return err;
  if (vec)
    dc_vec4<V><<<blocks, kThreads, 0, stream>>>(b, n, h);
  else
    dc_scalar<V><<<blocks, kThreads, 0, stream>>>(b, n, h);
  return cudaGetLastError();
}

// Turns the run-time choices (which pointers are set) into template flags, one at a time.
template <bool... Flags>
cudaError_t dispatch(const Buffers& b, int64_t n, const Hyper& h, cudaStream_t stream) {
  constexpr size_t k = sizeof...(Flags);
  if constexpr (k == 5) {
    return launch<Variant<Flags...>>(b, n, h, stream);
  } else {
    const void* const which[] = {b.ms, b.v, b.d_out, b.w_out, b.w_out2};
    return which[k] ? dispatch<Flags..., true>(b, n, h, stream)
                    : dispatch<Flags..., false>(b, n, h, stream);
  }
}

}  // namespace

extern "C" {

// One fused pass on device pointers; outputs and options as hpctrain_dc_step in dc_update.cpp.
int hpctrain_dc_step_cuda(float* d_out, float* w_out, float* w_out2, const float* w,
                          const float* g, const float* w_bak, float* ms, float* v, int64_t n,
                          float lr, float lam, float ms_decay, float weight_decay, float momentum,
                          cudaStream_t stream) {
  const Buffers b{d_out, w_out, w_out2, w, g, w_bak, ms, v};
  return dispatch<>(b, n, Hyper{lr, lam, ms_decay, weight_decay, momentum}, stream);
}

// The message for an error code the launchers returned.
const char* hpctrain_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // extern "C"
