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
// The D channels may arrive as several streams (separate arrays [N, L, D_s], side by side
// in the channels of w, the buffers and their gradients), so that a caller with several
// inputs to convolve (a block's queries, keys and values) neither concatenates nor splits.
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
  int64_t n, l, d, w;  // d: all the streams' channels
  int64_t hist() const { return w - 1; }
};

// One stream: its channels [c0, c0 + d) of w and the buffers, its input and its output
// (or, backwards, the output's cotangent and the input's gradient).
template <typename T>
struct Stream {
  const T* x;
  const T* other;  // backwards: g_y
  T* out;          // forwards: y; backwards: g_x
  int64_t d, c0;
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

// The stream's channels of a buffer entry (see Sources), or nullptr for an empty one.
template <typename T>
inline const T* Entry(const Sizes& s, const Stream<T>& st, int64_t where, const T* buf0,
                      int64_t row) {
  if (where >= 0) return st.x + (row * s.l + where) * st.d;
  if (where == kEmpty) return nullptr;
  return buf0 + (row * s.hist() + (-2 - where)) * s.d + st.c0;
}

template <typename T, bool kFlags>
void ForwardRow(const Sizes& s, const std::vector<Stream<T>>& streams, const T* w,
                const int8_t* fl, const T* buf0, T* buf_last, int64_t row) {
  const int64_t h = s.hist();
  std::vector<int64_t> src((s.l + 1) * h);
  Sources<kFlags>(s, fl, row, src);
  for (const Stream<T>& st : streams) {
    const int64_t d = st.d;
    const T* wl = w + h * s.d + st.c0;
    for (int64_t t = 0; t < s.l; ++t) {
      const T* xt = st.x + (row * s.l + t) * d;
      T* yt = st.out + (row * s.l + t) * d;
#pragma GCC ivdep
      for (int64_t c = 0; c < d; ++c) yt[c] = wl[c] * xt[c];
      for (int64_t p = 0; p < h; ++p) {
        const T* e = Entry(s, st, src[t * h + p], buf0, row);
        if (e == nullptr) continue;
        const T* wp = w + p * s.d + st.c0;
#pragma GCC ivdep
        for (int64_t c = 0; c < d; ++c) yt[c] += wp[c] * e[c];
      }
    }
    for (int64_t p = 0; p < h; ++p) {
      const T* e = Entry(s, st, src[s.l * h + p], buf0, row);
      T* out = buf_last + (row * h + p) * s.d + st.c0;
      if (e == nullptr) {
        std::fill(out, out + d, T(0));
      } else {
        std::copy(e, e + d, out);
      }
    }
  }
}

// g_w is [N, W, D] (each row's sums, summed over the rows in JAX).
template <typename T, bool kFlags>
void BackwardRow(const Sizes& s, const std::vector<Stream<T>>& streams, const T* w,
                 const int8_t* fl, const T* buf0, const T* g_last, T* g_w, T* g_buf0,
                 int64_t row) {
  const int64_t h = s.hist();
  std::vector<int64_t> src((s.l + 1) * h);
  Sources<kFlags>(s, fl, row, src);
  for (const Stream<T>& st : streams) {
    const int64_t d = st.d;
    // lam[p]: the cotangent of buffer entry p after the current step.
    std::vector<T> lam(h * d), acc((h + 1) * d, T(0));
    for (int64_t p = 0; p < h; ++p) {
      const T* g = g_last + (row * h + p) * s.d + st.c0;
      std::copy(g, g + d, lam.begin() + p * d);
    }
    const T* wl = w + h * s.d + st.c0;
    for (int64_t t = s.l - 1; t >= 0; --t) {
      const int8_t code = kFlags ? fl[row * s.l + t] : 0;
      const T* xt = st.x + (row * s.l + t) * d;
      const T* gy = st.other + (row * s.l + t) * d;
      T* gx = st.out + (row * s.l + t) * d;
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
        const T* wp = w + p * s.d + st.c0;
        T* lp = lam.data() + p * d;
#pragma GCC ivdep
        for (int64_t c = 0; c < d; ++c) lp[c] += wp[c] * gy[c];
        const T* e = Entry(s, st, src[t * h + p], buf0, row);
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
      std::copy(lam.begin() + p * d, lam.begin() + (p + 1) * d,
                g_buf0 + (row * h + p) * s.d + st.c0);
    }
    for (int64_t p = 0; p <= h; ++p) {
      std::copy(acc.begin() + p * d, acc.begin() + (p + 1) * d,
                g_w + (row * s.w + p) * s.d + st.c0);
    }
  }
}

// Sizes from w ([W, D]) and the streams' inputs ([N, L, D_s], summing to D); checks the
// arguments both kernels take.
ffi::Error CheckCommon(const ffi::AnyBuffer& w, const ffi::AnyBuffer& fl,
                       const ffi::AnyBuffer& buf0, const std::vector<ffi::AnyBuffer>& xs,
                       Sizes* s, bool* has_flags) {
  auto dw = w.dimensions();
  if (dw.size() != 2 || xs.empty()) return Invalid("`w` must be [W, D], with a stream.");
  auto dx = xs[0].dimensions();
  if (dx.size() != 3) return Invalid("every stream must be [N, L, D_s].");
  *s = Sizes{dx[0], dx[1], dw[1], dw[0]};
  if (s->w < 1) return Invalid("`w` needs at least one tap.");
  const ffi::DataType dt = w.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::F64) {
    return Invalid("float32 or float64 only.");
  }
  int64_t total = 0;
  for (const ffi::AnyBuffer& x : xs) {
    auto d = x.dimensions();
    if (d.size() != 3 || d[0] != s->n || d[1] != s->l || x.element_type() != dt) {
      return Invalid("the streams must share [N, L] and the dtype of `w`.");
    }
    total += d[2];
  }
  if (total != s->d) return Invalid("the streams' channels must add up to those of `w`.");
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(buf0, "initial buffer", {s->n, s->hist(), s->d}, dt));
  *has_flags = fl.element_count() > 0;
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckDims(fl, "flags", {*has_flags ? s->n * s->l : 0}, ffi::DataType::S8));
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::AnyBuffer fl,
                       ffi::AnyBuffer buf0, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  // args: the streams' x; rets: the final buffer, then the streams' y.
  std::vector<ffi::AnyBuffer> xs;
  for (size_t i = 0; i < args.size(); ++i) xs.push_back(*args.get<ffi::AnyBuffer>(i));
  Sizes s;
  bool has_flags;
  FLAX_LINOSS_RETURN_IF_ERROR(CheckCommon(w, fl, buf0, xs, &s, &has_flags));
  if (rets.size() != xs.size() + 1) return Invalid("one output per stream and the buffer.");
  const ffi::DataType dt = w.element_type();
  auto last = *rets.get<ffi::AnyBuffer>(0);
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*last, "final buffer", {s.n, s.hist(), s.d}, dt));
  std::vector<ffi::Result<ffi::AnyBuffer>> ys;
  for (size_t i = 0; i < xs.size(); ++i) {
    ys.push_back(*rets.get<ffi::AnyBuffer>(i + 1));
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*ys.back(), "y", {s.n, s.l, xs[i].dimensions()[2]}, dt));
  }
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  WithTypeAndFlags(dt, has_flags, [&](auto zero, auto with_flags) {
    using T = decltype(zero);
    std::vector<Stream<T>> streams;
    int64_t c0 = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      const int64_t d = xs[i].dimensions()[2];
      streams.push_back({xs[i].typed_data<T>(), nullptr, ys[i]->typed_data<T>(), d, c0});
      c0 += d;
    }
    ParallelFor(pool, s.n, [&](int64_t row) {
      ForwardRow<T, decltype(with_flags)::value>(s, streams, w.typed_data<T>(), flags,
                                                 buf0.typed_data<T>(), last->typed_data<T>(),
                                                 row);
    });
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::AnyBuffer fl,
                        ffi::AnyBuffer buf0, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  // args: the final buffer's cotangent, the streams' x, then their y's cotangents; rets:
  // g_w [N, W, D], the initial buffer's gradient, then the streams' g_x.
  if (args.size() < 3 || args.size() % 2 != 1) return Invalid("g_last, then x and g_y pairs.");
  const size_t count = (args.size() - 1) / 2;
  ffi::AnyBuffer g_last = *args.get<ffi::AnyBuffer>(0);
  std::vector<ffi::AnyBuffer> xs, gys;
  for (size_t i = 0; i < count; ++i) {
    xs.push_back(*args.get<ffi::AnyBuffer>(1 + i));
    gys.push_back(*args.get<ffi::AnyBuffer>(1 + count + i));
  }
  Sizes s;
  bool has_flags;
  FLAX_LINOSS_RETURN_IF_ERROR(CheckCommon(w, fl, buf0, xs, &s, &has_flags));
  if (rets.size() != count + 2) return Invalid("g_w, the buffer's and one per stream.");
  const ffi::DataType dt = w.element_type();
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(g_last, "g_last", {s.n, s.hist(), s.d}, dt));
  auto g_w = *rets.get<ffi::AnyBuffer>(0);
  auto g_buf0 = *rets.get<ffi::AnyBuffer>(1);
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_w, "g_w", {s.n, s.w, s.d}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_buf0, "g_buf0", {s.n, s.hist(), s.d}, dt));
  std::vector<ffi::Result<ffi::AnyBuffer>> gxs;
  for (size_t i = 0; i < count; ++i) {
    const int64_t d = xs[i].dimensions()[2];
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(gys[i], "g_y", {s.n, s.l, d}, dt));
    gxs.push_back(*rets.get<ffi::AnyBuffer>(2 + i));
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*gxs.back(), "g_x", {s.n, s.l, d}, dt));
  }
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  WithTypeAndFlags(dt, has_flags, [&](auto zero, auto with_flags) {
    using T = decltype(zero);
    std::vector<Stream<T>> streams;
    int64_t c0 = 0;
    for (size_t i = 0; i < count; ++i) {
      const int64_t d = xs[i].dimensions()[2];
      streams.push_back(
          {xs[i].typed_data<T>(), gys[i].typed_data<T>(), gxs[i]->typed_data<T>(), d, c0});
      c0 += d;
    }
    ParallelFor(pool, s.n, [&](int64_t row) {
      BackwardRow<T, decltype(with_flags)::value>(
          s, streams, w.typed_data<T>(), flags, buf0.typed_data<T>(), g_last.typed_data<T>(),
          g_w->typed_data<T>(), g_buf0->typed_data<T>(), row);
    });
  });
  return ffi::Error::Success();
}

// The context and the arguments both kernels take, in this order; the streams follow.
auto BindCommon() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()   // w [W, D]
      .Arg<ffi::AnyBuffer>()   // flags [N * L] int8, or [0]
      .Arg<ffi::AnyBuffer>();  // initial buffer [N, W - 1, D]
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossConvForward, ForwardImpl,
                              BindCommon().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossConvBackward, BackwardImpl,
                              BindCommon().RemainingArgs().RemainingRets());
