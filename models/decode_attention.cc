// A decode step's attention on the CPU, as an XLA FFI custom call: each (row, kv head) pair's
// queries attend to the first lengths[row] slots of its cached keys and values.
//
// XLA:CPU runs attention's batched matrix-vector products one (row, head) at a time on one core at
// about half the memory bandwidth; this kernel streams each pair's keys and values once, fuses the
// softmax, and shares the pairs among XLA's intra-op threads.
//
// Built by models/cpu_kernels.py with -ffast-math (vectorised exp and sums) at compile time only:
// linked without it, so that loading the library leaves the process's denormal handling alone.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Pairs {
  int64_t kv_heads, group, slots, dim;
};

// One pair: queries [group, dim], keys and values [slots, dim] of which the first `length` count.
template <int64_t kDim>
void AttendPair(const Pairs& shape, const float* __restrict q, const float* __restrict k,
                const float* __restrict v, int64_t length, float* __restrict out, float* __restrict scores) {
  if (length == 0) {
    std::fill(out, out + shape.group * kDim, 0.0f);
    return;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  for (int64_t g = 0; g < shape.group; ++g) {
    float query[kDim], acc[kDim] = {};
    for (int64_t d = 0; d < kDim; ++d) query[d] = q[g * kDim + d] * scale;
    for (int64_t j = 0; j < length; ++j) {
      float dot = 0.0f;
      for (int64_t d = 0; d < kDim; ++d) dot += query[d] * k[j * kDim + d];
      scores[j] = dot;
    }
    const float top = *std::max_element(scores, scores + length);
    float total = 0.0f;
    for (int64_t j = 0; j < length; ++j) {
      scores[j] = std::exp(scores[j] - top);
      total += scores[j];
    }
    for (int64_t j = 0; j < length; ++j)
      for (int64_t d = 0; d < kDim; ++d) acc[d] += scores[j] * v[j * kDim + d];
    for (int64_t d = 0; d < kDim; ++d) out[g * kDim + d] = acc[d] / total;
  }
}

// The pairs, in chunks taken in turn by the calling thread and the pool's: the caller never waits
// for a chunk no thread has started, so a busy pool only makes it do more of them itself.
struct Work {
  Pairs shape;
  const float *q, *k, *v;
  const int32_t* lengths;
  float* out;
  int64_t pairs, chunk, chunks;
  void (*attend)(const Pairs&, const float*, const float*, const float*, int64_t, float*, float*);
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    std::vector<float> scores(shape.slots);
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      for (int64_t p = c * chunk; p < std::min(pairs, (c + 1) * chunk); ++p) {
        const int64_t length = std::clamp<int64_t>(lengths[p / shape.kv_heads], 0, shape.slots);
        const int64_t query = p * shape.group * shape.dim, cached = p * shape.slots * shape.dim;
        attend(shape, q + query, k + cached, v + cached, length, out + query, scores.data());
      }
      done.fetch_add(1);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || lengths.dimensions().size() != 1 ||
      qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      lengths.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument(
        "decode attention takes queries [rows, kv_heads, group, dim], keys and values [rows, kv_heads, slots, dim] "
        "and lengths [rows]");
  auto work = std::make_shared<Work>();
  switch (qd[3]) {
    case 8: work->attend = AttendPair<8>; break;
    case 16: work->attend = AttendPair<16>; break;
    case 32: work->attend = AttendPair<32>; break;
    case 64: work->attend = AttendPair<64>; break;
    case 128: work->attend = AttendPair<128>; break;
    default: return ffi::Error::InvalidArgument("decode attention supports head dims 8, 16, 32, 64 and 128");
  }
  work->shape = {qd[1], qd[2], kd[2], qd[3]};
  work->q = q.typed_data();
  work->k = k.typed_data();
  work->v = v.typed_data();
  work->lengths = lengths.typed_data();
  work->out = out->typed_data();
  work->pairs = qd[0] * qd[1];
  work->chunk = std::max<int64_t>(1, work->pairs / 16);
  work->chunks = (work->pairs + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load() < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // queries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>());
