// Fused CPU kernels for the short causal depthwise convolution over the valid steps of a
// sequence (flax_linoss/ops/conv.py), called from JAX as XLA FFI custom calls
// (flax_linoss/ops/_scans/native.py compiles and registers them).
//
// Per batch row, a buffer b of the last W - 1 valid inputs (oldest first, [W - 1, D]) and
//
//   y_t = w[W - 1] x_t + sum_p w[p] b[p]       (b as it is before step t, after a reset)
//
// then, at a valid step, b shifts by one and takes x_t as its newest entry. Flags as in
// lti_recurrence.cc: a reset empties the buffer before the step (a segment start), a held
// (masked) step leaves it unchanged (its output still reads its own input and the buffer).
//
// ConvForward writes y and the final buffer. ConvBackward walks the steps backwards with
// the buffer's cotangent (W - 1 rows), finding each step's buffer from a per-row list of
// where every entry came from (an input step, a slot of the initial buffer, or empty).
// Work items are batch rows. Float32 and float64.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ffi_util.h"

namespace ffi = xla::ffi;
using flax_linoss::CheckDims;
using flax_linoss::Invalid;
using flax_linoss::kHold;
using flax_linoss::kReset;
using flax_linoss::ParallelFor;
using flax_linoss::WithTypeAndFlags;

namespace {

struct Sizes {
  int64_t n, l, d, w;
  int64_t hist() const { return w - 1; }
};

constexpr int64_t kEmpty = -1;  // a buffer entry that holds nothing (zero)

// src[t * (W - 1) + p]: where entry p of the buffer before step t (after its reset) comes
// from: an input step s >= 0, slot k of the initial buffer (-2 - k), or kEmpty.
template <bool kFlags>
void Sources(const Sizes& s, const int8_t* fl, int64_t row, std::vector<int64_t>& src) {
  const int64_t h = s.hist();
  std::vector<int64_t> buf(h);
  for (int64_t p = 0; p < h; ++p) buf[p] = -2 - p;
  for (int64_t t = 0; t < s.l; ++t) {
    const int8_t code = kFlags ? fl[row * s.l + t] : 0;
    if (code & kReset) std::fill(buf.begin(), buf.end(), kEmpty);
    std::copy(buf.begin(), buf.end(), src.begin() + t * h);
    if (!(code & kHold) && h > 0) {
      std::copy(buf.begin() + 1, buf.end(), buf.begin());
      buf[h - 1] = t;
    }
  }
  // Entry L: the buffer after the last step.
  std::copy(buf.begin(), buf.end(), src.begin() + s.l * h);
}

template <typename T>
inline const T* Entry(const Sizes& s, int64_t where, const T* x, const T* buf0, int64_t row) {
  if (where >= 0) return x + (row * s.l + where) * s.d;
  if (where == kEmpty) return nullptr;
  return buf0 + (row * s.hist() + (-2 - where)) * s.d;
}

template <typename T, bool kFlags>
void ForwardRow(const Sizes& s, const T* x, const T* w, const int8_t* fl, const T* buf0, T* y,
                T* buf_last, int64_t row) {
  const int64_t h = s.hist(), d = s.d;
  std::vector<int64_t> src((s.l + 1) * h);
  Sources<kFlags>(s, fl, row, src);
  for (int64_t t = 0; t < s.l; ++t) {
    const T* xt = x + (row * s.l + t) * d;
    T* yt = y + (row * s.l + t) * d;
    const T* wl = w + h * d;
#pragma GCC ivdep
    for (int64_t c = 0; c < d; ++c) yt[c] = wl[c] * xt[c];
    for (int64_t p = 0; p < h; ++p) {
      const T* e = Entry(s, src[t * h + p], x, buf0, row);
      if (e == nullptr) continue;
      const T* wp = w + p * d;
#pragma GCC ivdep
      for (int64_t c = 0; c < d; ++c) yt[c] += wp[c] * e[c];
    }
  }
  for (int64_t p = 0; p < h; ++p) {
    const T* e = Entry(s, src[s.l * h + p], x, buf0, row);
    T* out = buf_last + (row * h + p) * d;
    if (e == nullptr) {
      std::fill(out, out + d, T(0));
    } else {
      std::copy(e, e + d, out);
    }
  }
}

// g_w is [N, W, D] (each row's sums, summed over the rows in JAX).
template <typename T, bool kFlags>
void BackwardRow(const Sizes& s, const T* x, const T* w, const int8_t* fl, const T* buf0,
                 const T* g_y, const T* g_last, T* g_x, T* g_w, T* g_buf0, int64_t row) {
  const int64_t h = s.hist(), d = s.d;
  std::vector<int64_t> src((s.l + 1) * h);
  Sources<kFlags>(s, fl, row, src);
  // lam[p]: the cotangent of buffer entry p after the current step.
  std::vector<T> lam(g_last + row * h * d, g_last + (row + 1) * h * d);
  std::vector<T> acc((h + 1) * d, T(0));
  for (int64_t t = s.l - 1; t >= 0; --t) {
    const int8_t code = kFlags ? fl[row * s.l + t] : 0;
    const T* xt = x + (row * s.l + t) * d;
    const T* gy = g_y + (row * s.l + t) * d;
    T* gx = g_x + (row * s.l + t) * d;
    const T* wl = w + h * d;
    T* al = acc.data() + h * d;
#pragma GCC ivdep
    for (int64_t c = 0; c < d; ++c) {
      gx[c] = wl[c] * gy[c];
      al[c] += xt[c] * gy[c];
    }
    // Back through the shift of a valid step: x_t became the newest entry, entry p + 1
    // became entry p, the oldest left.
    if (!(code & kHold) && h > 0) {
      const T* newest = lam.data() + (h - 1) * d;
#pragma GCC ivdep
      for (int64_t c = 0; c < d; ++c) gx[c] += newest[c];
      std::copy_backward(lam.begin(), lam.begin() + (h - 1) * d, lam.begin() + h * d);
      std::fill(lam.begin(), lam.begin() + d, T(0));
    }
    // The read of the buffer before the step.
    for (int64_t p = 0; p < h; ++p) {
      const T* wp = w + p * d;
      T* lp = lam.data() + p * d;
#pragma GCC ivdep
      for (int64_t c = 0; c < d; ++c) lp[c] += wp[c] * gy[c];
      const T* e = Entry(s, src[t * h + p], x, buf0, row);
      if (e == nullptr) continue;
      T* ap = acc.data() + p * d;
#pragma GCC ivdep
      for (int64_t c = 0; c < d; ++c) ap[c] += e[c] * gy[c];
    }
    // Each entry's cotangent goes to the input it holds: added there when the step that
    // wrote it is reached (an entry holding x_s is exactly x_s). A reset cuts the buffer
    // off from everything before the step.
    if (code & kReset) std::fill(lam.begin(), lam.end(), T(0));
  }
  for (int64_t p = 0; p < h; ++p) {
    T* out = g_buf0 + (row * h + p) * d;
    std::copy(lam.begin() + p * d, lam.begin() + (p + 1) * d, out);
  }
  std::copy(acc.begin(), acc.end(), g_w + row * (h + 1) * d);
}

// Sizes from x ([N, L, D]) and w ([W, D]); checks the arguments both kernels take.
ffi::Error CheckCommon(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
                       const ffi::AnyBuffer& fl, const ffi::AnyBuffer& buf0, Sizes* s,
                       bool* has_flags) {
  auto dx = x.dimensions();
  auto dw = w.dimensions();
  if (dx.size() != 3 || dw.size() != 2) return Invalid("`x` must be [N, L, D], `w` [W, D].");
  *s = Sizes{dx[0], dx[1], dx[2], dw[0]};
  if (s->w < 1) return Invalid("`w` needs at least one tap.");
  const ffi::DataType dt = x.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::F64) {
    return Invalid("float32 or float64 only.");
  }
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(w, "w", {s->w, s->d}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(buf0, "initial buffer", {s->n, s->hist(), s->d}, dt));
  *has_flags = fl.element_count() > 0;
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckDims(fl, "flags", {*has_flags ? s->n * s->l : 0}, ffi::DataType::S8));
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                       ffi::AnyBuffer fl, ffi::AnyBuffer buf0, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> buf_last) {
  Sizes s;
  bool has_flags;
  FLAX_LINOSS_RETURN_IF_ERROR(CheckCommon(x, w, fl, buf0, &s, &has_flags));
  const ffi::DataType dt = x.element_type();
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*y, "y", {s.n, s.l, s.d}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*buf_last, "final buffer", {s.n, s.hist(), s.d}, dt));
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  WithTypeAndFlags(dt, has_flags, [&](auto zero, auto with_flags) {
    using T = decltype(zero);
    ParallelFor(pool, s.n, [&](int64_t row) {
      ForwardRow<T, decltype(with_flags)::value>(s, x.typed_data<T>(), w.typed_data<T>(),
                                                 flags, buf0.typed_data<T>(), y->typed_data<T>(),
                                                 buf_last->typed_data<T>(), row);
    });
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                        ffi::AnyBuffer fl, ffi::AnyBuffer buf0, ffi::AnyBuffer g_y,
                        ffi::AnyBuffer g_last, ffi::Result<ffi::AnyBuffer> g_x,
                        ffi::Result<ffi::AnyBuffer> g_w, ffi::Result<ffi::AnyBuffer> g_buf0) {
  Sizes s;
  bool has_flags;
  FLAX_LINOSS_RETURN_IF_ERROR(CheckCommon(x, w, fl, buf0, &s, &has_flags));
  const ffi::DataType dt = x.element_type();
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(g_y, "g_y", {s.n, s.l, s.d}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(g_last, "g_last", {s.n, s.hist(), s.d}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_x, "g_x", {s.n, s.l, s.d}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_w, "g_w", {s.n, s.w, s.d}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_buf0, "g_buf0", {s.n, s.hist(), s.d}, dt));
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  WithTypeAndFlags(dt, has_flags, [&](auto zero, auto with_flags) {
    using T = decltype(zero);
    ParallelFor(pool, s.n, [&](int64_t row) {
      BackwardRow<T, decltype(with_flags)::value>(
          s, x.typed_data<T>(), w.typed_data<T>(), flags, buf0.typed_data<T>(),
          g_y.typed_data<T>(), g_last.typed_data<T>(), g_x->typed_data<T>(),
          g_w->typed_data<T>(), g_buf0->typed_data<T>(), row);
    });
  });
  return ffi::Error::Success();
}

// The context and the four arguments both kernels take, in this order.
auto BindCommon() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()   // x [N, L, D]
      .Arg<ffi::AnyBuffer>()   // w [W, D]
      .Arg<ffi::AnyBuffer>()   // flags [N * L] int8, or [0]
      .Arg<ffi::AnyBuffer>();  // initial buffer [N, W - 1, D]
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossConvForward, ForwardImpl,
                              BindCommon()
                                  .Ret<ffi::AnyBuffer>()   // y [N, L, D]
                                  .Ret<ffi::AnyBuffer>()); // final buffer [N, W - 1, D]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossConvBackward, BackwardImpl,
                              BindCommon()
                                  .Arg<ffi::AnyBuffer>()   // g_y [N, L, D]
                                  .Arg<ffi::AnyBuffer>()   // g of the final buffer
                                  .Ret<ffi::AnyBuffer>()   // g_x [N, L, D]
                                  .Ret<ffi::AnyBuffer>()   // g_w [N, W, D]
                                  .Ret<ffi::AnyBuffer>()); // g of the initial buffer
