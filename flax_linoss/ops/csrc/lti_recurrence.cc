// Fused CPU kernels for the LinOSS recurrence, called from JAX as XLA FFI custom calls
// (see flax_linoss/ops/native.py, which compiles and registers them).
//
// The recurrence runs on Q real channels, each with a 2-vector state x = (z, y), a 2x2
// transition M and forcing f (see flax_linoss/ops/schemes.py):
//
//   z_t = m11 z_{t-1} + m12 y_{t-1} + f1 v_t
//   y_t = m21 z_{t-1} + m22 y_{t-1} + f2 v_t
//
// The six coefficients arrive as six buffers, each either time-invariant ([Q]) or given per
// step ([N * L, Q], a transition per batch row and step: a time-varying dt); the kernels are
// compiled for both.
//
// LtiForward writes every y_t (the layer's output needs them), the final z, and z at the
// start of every chunk of `chunk` steps (a checkpoint). It never writes the [N * L, Q]
// array of velocities.
//
// LtiBackward walks the chunks from last to first. For each chunk it recomputes the
// chunk's velocities from the checkpoint (into a buffer that stays in cache), then runs
// the exact adjoint recurrence
//
//   lambda_t = M^T lambda_{t+1} + (0, g_y_t),   starting from (g_z_L, 0),
//
// backwards through the chunk, accumulating in the same pass the gradients of the input
// v, of the six coefficients (per batch row, summed in JAX; with per-step coefficients each
// step's own gradient, [6, N * L, Q]) and of the initial state.
// It is the backward pass of the "adjoint" path (_scans/adjoint.py) as one cache-friendly
// loop. g_v may share its buffer with g_y (each g_y_t is read before g_v_t is written).
//
// Optional per-step flags (one int8 per batch row and step, [N * L], or an empty buffer):
// bit 1 "hold" (a masked step leaves the state unchanged), bit 2 "reset" (the state restarts
// from zero before the step, where a packed segment starts). Both passes are templated on
// whether flags are present, so the unflagged loops stay branch-free, and on whether the
// coefficients vary per step, so the time-invariant loops are unchanged.
//
// Work items are (batch row, block of up to kBlock channels), spread over XLA's intra-op
// thread pool. An item streams over time with its state in small arrays, so a pass reads
// and writes each [N * L, Q] array once, in whole contiguous rows. Float32 and float64.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ffi_util.h"

namespace ffi = xla::ffi;
using flax_linoss::CheckDims;
using flax_linoss::kHold;
using flax_linoss::kReset;
using flax_linoss::Invalid;
using flax_linoss::ParallelFor;

namespace {

constexpr int64_t kBlock = 512;  // channels per work item (a whole row for Q <= 512)

struct Sizes {
  int64_t n, l, q, chunk, chunks;
  int64_t blocks() const { return (q + kBlock - 1) / kBlock; }
  int64_t items() const { return n * blocks(); }
};

// The six coefficient rows of one step (or of every step, when time-invariant).
template <typename T>
struct Coefs {
  const T* m11;
  const T* m12;
  const T* m21;
  const T* m22;
  const T* f1;
  const T* f2;
};

// One item's view: batch row n, channels [q0, q0 + w); the six coefficient buffers are
// [Q] or, with kVarying, [N * L, Q].
template <typename T, bool kVarying>
struct Item {
  int64_t n, q0, w;
  const Coefs<T>& c;
  Item(const Sizes& s, const Coefs<T>& c_, int64_t i)
      : n(i / s.blocks()), q0((i % s.blocks()) * kBlock), w(std::min(kBlock, s.q - q0)), c(c_) {}
  // Offset of (n, t, q0) in an [N * L, Q] array and of (n, q0) in an [N, Q] array.
  int64_t at(const Sizes& s, int64_t t) const { return (n * s.l + t) * s.q + q0; }
  int64_t row(const Sizes& s) const { return n * s.q + q0; }
  // The coefficients of step t (any t when time-invariant).
  Coefs<T> coefs(const Sizes& s, int64_t t) const {
    const int64_t o = kVarying ? at(s, t) : q0;
    return {c.m11 + o, c.m12 + o, c.m21 + o, c.m22 + o, c.f1 + o, c.f2 + o};
  }
};

// z_t from z_{t-1}, y_{t-1} and v_t; the one expression both passes use, so the backward
// pass recomputes exactly the velocities the forward pass had.
template <typename T>
inline T NextZ(const Coefs<T>& k, int64_t j, T z, T y, T v) {
  return k.m11[j] * z + k.m12[j] * y + k.f1[j] * v;
}

template <typename T>
inline T NextY(const Coefs<T>& k, int64_t j, T z, T y, T v) {
  return k.m21[j] * z + k.m22[j] * y + k.f2[j] * v;
}

template <typename T, bool kFlags, bool kVarying>
void ForwardItem(const Sizes& s, const Coefs<T>& c, const T* v, const int8_t* fl, const T* z0,
                 const T* y0, T* ys, T* z_last, T* z_ck, int64_t i) {
  const Item<T, kVarying> k(s, c, i);
  const Coefs<T> fixed = k.coefs(s, 0);
  T z[kBlock], y[kBlock];
  for (int64_t j = 0; j < k.w; ++j) {
    z[j] = z0[k.row(s) + j];
    y[j] = y0[k.row(s) + j];
  }
  for (int64_t t = 0; t < s.l; ++t) {
    if (t % s.chunk == 0) {
      T* ck = z_ck + (k.n * s.chunks + t / s.chunk) * s.q + k.q0;
      for (int64_t j = 0; j < k.w; ++j) ck[j] = z[j];
    }
    const T* __restrict__ vt = v + k.at(s, t);
    T* __restrict__ yt = ys + k.at(s, t);
    if constexpr (kFlags) {
      const int8_t code = fl[k.n * s.l + t];
      if (code & kReset) {
        for (int64_t j = 0; j < k.w; ++j) z[j] = y[j] = T(0);
      }
      if (code & kHold) {
        for (int64_t j = 0; j < k.w; ++j) yt[j] = y[j];
        continue;
      }
    }
    const Coefs<T> m = kVarying ? k.coefs(s, t) : fixed;
#pragma GCC ivdep
    for (int64_t j = 0; j < k.w; ++j) {
      const T zn = NextZ(m, j, z[j], y[j], vt[j]);
      const T yn = NextY(m, j, z[j], y[j], vt[j]);
      z[j] = zn;
      y[j] = yn;
      yt[j] = yn;
    }
  }
  for (int64_t j = 0; j < k.w; ++j) z_last[k.row(s) + j] = z[j];
}

// Prefetches rows [t0, t1) of an [N * L, Q] array, in ascending order, into cache.
template <typename T, typename K>
inline void PrefetchRows(const Sizes& s, const K& k, const T* x, int64_t t0, int64_t t1,
                         bool for_write) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t t = t0; t < t1; ++t) {
    const T* row = x + k.at(s, t);
    for (int64_t j = 0; j < k.w; j += kLine) {
      if (for_write) {
        __builtin_prefetch(row + j, 1, 3);
      } else {
        __builtin_prefetch(row + j, 0, 3);
      }
    }
  }
}

// With kVarying, g_c is [6, N * L, Q] and receives each step's coefficient gradient;
// otherwise [N, 6, Q], the sums over the row's steps.
template <typename T, bool kFlags, bool kVarying>
void BackwardItem(const Sizes& s, const Coefs<T>& c, const T* v, const int8_t* fl, const T* z0,
                  const T* y0, const T* ys, const T* z_ck, const T* g_ys, const T* g_zl,
                  T* g_v, T* g_c, T* g_z0, T* g_y0, int64_t i) {
  const Item<T, kVarying> k(s, c, i);
  const Coefs<T> fixed = k.coefs(s, 0);
  const int64_t w = k.w;
  // Where step t's six coefficient gradients go (kVarying only).
  auto grads_at = [&](int64_t t, T* out[6]) {
    for (int a = 0; a < 6; ++a) out[a] = g_c + a * s.n * s.l * s.q + k.at(s, t);
  };
  // Row r of zbuf / ybuf holds z / y after step t0 + r - 1 of the current chunk [t0, t1); row
  // 0 is the state before the chunk (checkpoint, and y from the forward output).
  std::vector<T> zbuf((s.chunk + 1) * w), ybuf((s.chunk + 1) * w);
  T rz[kBlock], ry[kBlock], acc[6][kBlock];
  for (int64_t j = 0; j < w; ++j) {
    rz[j] = g_zl[k.row(s) + j];
    ry[j] = T(0);
    for (int a = 0; a < 6; ++a) acc[a][j] = T(0);
  }
  auto code_at = [&](int64_t t) -> int8_t {
    if constexpr (kFlags) {
      return fl[k.n * s.l + t];
    } else {
      return 0;
    }
  };
  for (int64_t ci = s.chunks - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * s.chunk;
    const int64_t t1 = std::min(s.l, t0 + s.chunk);
    // The walk below goes down in time, which hardware prefetchers follow poorly: fetch the
    // chunk's cotangent rows (and the rows g_v will take) going up.
    PrefetchRows(s, k, g_ys, t0, t1, false);
    if (g_v != g_ys) PrefetchRows(s, k, static_cast<const T*>(g_v), t0, t1, true);
    const T* ck = z_ck + (k.n * s.chunks + ci) * s.q + k.q0;
    const T* y_before = t0 > 0 ? ys + k.at(s, t0 - 1) : y0 + k.row(s);
    std::copy(ck, ck + w, zbuf.data());
    std::copy(y_before, y_before + w, ybuf.data());
    // Recompute the states of the chunk but its last (never needed), from v going up.
    for (int64_t t = t0; t + 1 < t1; ++t) {
      const T* __restrict__ zp = zbuf.data() + (t - t0) * w;
      const T* __restrict__ yp = ybuf.data() + (t - t0) * w;
      const T* __restrict__ vt = v + k.at(s, t);
      T* __restrict__ zn = zbuf.data() + (t - t0 + 1) * w;
      T* __restrict__ yn = ybuf.data() + (t - t0 + 1) * w;
      const int8_t code = code_at(t);
      const Coefs<T> m = kVarying ? k.coefs(s, t) : fixed;
      if (kFlags && code != 0) {
        const T keep = (code & kReset) ? T(0) : T(1);
        for (int64_t j = 0; j < w; ++j) {
          const T z = keep * zp[j], y = keep * yp[j];
          zn[j] = (code & kHold) ? z : NextZ(m, j, z, y, vt[j]);
          yn[j] = (code & kHold) ? y : NextY(m, j, z, y, vt[j]);
        }
        continue;
      }
#pragma GCC ivdep
      for (int64_t j = 0; j < w; ++j) {
        zn[j] = NextZ(m, j, zp[j], yp[j], vt[j]);
        yn[j] = NextY(m, j, zp[j], yp[j], vt[j]);
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const T* __restrict__ zp = zbuf.data() + (t - t0) * w;
      const T* __restrict__ yp = ybuf.data() + (t - t0) * w;
      const T* __restrict__ vt = v + k.at(s, t);
      const T* gt = g_ys + k.at(s, t);
      T* gvt = g_v + k.at(s, t);  // may be gt: each g_y is read before its g_v is written
      const int8_t code = code_at(t);
      const Coefs<T> m = kVarying ? k.coefs(s, t) : fixed;
      T* gc[6];
      if constexpr (kVarying) grads_at(t, gc);
      if (kFlags && code != 0) {
        // rho_{t-1} = keep * A_t^T lambda_t; a held step has A_t = I and no forcing.
        const T keep = (code & kReset) ? T(0) : T(1);
        const bool hold = code & kHold;
        for (int64_t j = 0; j < w; ++j) {
          const T lz = rz[j];
          const T ly = ry[j] + gt[j];
          if (hold) {
            gvt[j] = T(0);
            if constexpr (kVarying) {
              for (int a = 0; a < 6; ++a) gc[a][j] = T(0);
            }
            rz[j] = keep * lz;
            ry[j] = keep * ly;
            continue;
          }
          const T z = keep * zp[j], y = keep * yp[j];
          gvt[j] = m.f1[j] * lz + m.f2[j] * ly;
          const T terms[6] = {lz * z, lz * y, ly * z, ly * y, lz * vt[j], ly * vt[j]};
          for (int a = 0; a < 6; ++a) {
            if constexpr (kVarying) {
              gc[a][j] = terms[a];
            } else {
              acc[a][j] += terms[a];
            }
          }
          rz[j] = keep * (m.m11[j] * lz + m.m21[j] * ly);
          ry[j] = keep * (m.m12[j] * lz + m.m22[j] * ly);
        }
        continue;
      }
      if constexpr (kVarying) {
#pragma GCC ivdep
        for (int64_t j = 0; j < w; ++j) {
          const T lz = rz[j];
          const T ly = ry[j] + gt[j];
          gvt[j] = m.f1[j] * lz + m.f2[j] * ly;
          gc[0][j] = lz * zp[j];
          gc[1][j] = lz * yp[j];
          gc[2][j] = ly * zp[j];
          gc[3][j] = ly * yp[j];
          gc[4][j] = lz * vt[j];
          gc[5][j] = ly * vt[j];
          rz[j] = m.m11[j] * lz + m.m21[j] * ly;
          ry[j] = m.m12[j] * lz + m.m22[j] * ly;
        }
      } else {
#pragma GCC ivdep
        for (int64_t j = 0; j < w; ++j) {
          const T lz = rz[j];
          const T ly = ry[j] + gt[j];
          gvt[j] = m.f1[j] * lz + m.f2[j] * ly;
          acc[0][j] += lz * zp[j];
          acc[1][j] += lz * yp[j];
          acc[2][j] += ly * zp[j];
          acc[3][j] += ly * yp[j];
          acc[4][j] += lz * vt[j];
          acc[5][j] += ly * vt[j];
          rz[j] = m.m11[j] * lz + m.m21[j] * ly;
          ry[j] = m.m12[j] * lz + m.m22[j] * ly;
        }
      }
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    if constexpr (!kVarying) {
      for (int a = 0; a < 6; ++a) g_c[(k.n * 6 + a) * s.q + k.q0 + j] = acc[a][j];
    }
    g_z0[k.row(s) + j] = rz[j];
    g_y0[k.row(s) + j] = ry[j];
  }
}

// Reads the sizes from v ([N * L, Q] rows of Q channels, `length` rows per sequence) and
// checks the arguments every kernel takes.
// The six coefficient buffers, in the order (m11, m12, m21, m22, f1, f2).
struct CoefBuffers {
  const ffi::AnyBuffer* b[6];
  template <typename T>
  Coefs<T> typed() const {
    return {b[0]->typed_data<T>(), b[1]->typed_data<T>(), b[2]->typed_data<T>(),
            b[3]->typed_data<T>(), b[4]->typed_data<T>(), b[5]->typed_data<T>()};
  }
};

ffi::Error CheckCommon(const CoefBuffers& c, const ffi::AnyBuffer& v,
                       const ffi::AnyBuffer& fl, const ffi::AnyBuffer& z0,
                       const ffi::AnyBuffer& y0, int64_t length, int64_t chunk, Sizes* s,
                       bool* has_flags, bool* varying) {
  auto d = v.dimensions();
  if (d.size() != 2) return Invalid("`v` must be [N * L, Q].");
  if (length < 1 || d[0] % length != 0) return Invalid("`length` must divide N * L.");
  if (chunk < 1) return Invalid("`chunk` must be >= 1.");
  *s = Sizes{d[0] / length, length, d[1], chunk, (length + chunk - 1) / chunk};
  const ffi::DataType dt = v.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::F64) {
    return Invalid("float32 or float64 only.");
  }
  *varying = c.b[0]->dimensions().size() == 2;
  for (int a = 0; a < 6; ++a) {
    if (*varying) {
      FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*c.b[a], "coeffs", {s->n * s->l, s->q}, dt));
    } else {
      FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*c.b[a], "coeffs", {s->q}, dt));
    }
  }
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(z0, "z0", {s->n, s->q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(y0, "y0", {s->n, s->q}, dt));
  *has_flags = fl.element_count() > 0;
  if (*has_flags) {
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(fl, "flags", {s->n * s->l}, ffi::DataType::S8));
  } else {
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(fl, "flags", {0}, ffi::DataType::S8));
  }
  return ffi::Error::Success();
}

// Calls fn(T{}, std::bool_constant<flags>{}, std::bool_constant<varying>{}) with T the
// element type of `dt` (float or double; checked before): one instantiation per element
// type, flag presence and coefficient kind.
template <typename F>
void WithElementType(ffi::DataType dt, bool has_flags, bool varying, const F& fn) {
  flax_linoss::WithTypeAndFlags(dt, has_flags, [&](auto zero, auto flags) {
    if (varying) {
      fn(zero, flags, std::true_type{});
    } else {
      fn(zero, flags, std::false_type{});
    }
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer m11, ffi::AnyBuffer m12,
                       ffi::AnyBuffer m21, ffi::AnyBuffer m22, ffi::AnyBuffer f1,
                       ffi::AnyBuffer f2, ffi::AnyBuffer v,
                       ffi::AnyBuffer fl, ffi::AnyBuffer z0, ffi::AnyBuffer y0,
                       ffi::Result<ffi::AnyBuffer> ys, ffi::Result<ffi::AnyBuffer> z_last,
                       ffi::Result<ffi::AnyBuffer> z_ck, int64_t length, int64_t chunk) {
  const CoefBuffers c{{&m11, &m12, &m21, &m22, &f1, &f2}};
  Sizes s;
  bool has_flags, varying;
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckCommon(c, v, fl, z0, y0, length, chunk, &s, &has_flags, &varying));
  const ffi::DataType dt = v.element_type();
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*ys, "ys", {s.n * s.l, s.q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*z_last, "z_last", {s.n, s.q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*z_ck, "z_ck", {s.n, s.chunks, s.q}, dt));
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  WithElementType(dt, has_flags, varying, [&](auto zero, auto with_flags, auto per_step) {
    using T = decltype(zero);
    ParallelFor(pool, s.items(), [&](int64_t i) {
      ForwardItem<T, decltype(with_flags)::value, decltype(per_step)::value>(
          s, c.typed<T>(), v.typed_data<T>(), flags, z0.typed_data<T>(),
          y0.typed_data<T>(), ys->typed_data<T>(), z_last->typed_data<T>(),
          z_ck->typed_data<T>(), i);
    });
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer m11, ffi::AnyBuffer m12,
                        ffi::AnyBuffer m21, ffi::AnyBuffer m22, ffi::AnyBuffer f1,
                        ffi::AnyBuffer f2, ffi::AnyBuffer v,
                        ffi::AnyBuffer fl, ffi::AnyBuffer z0, ffi::AnyBuffer y0,
                        ffi::AnyBuffer ys,
                        ffi::AnyBuffer z_ck, ffi::AnyBuffer g_ys, ffi::AnyBuffer g_zl,
                        ffi::Result<ffi::AnyBuffer> g_v, ffi::Result<ffi::AnyBuffer> g_c,
                        ffi::Result<ffi::AnyBuffer> g_z0, ffi::Result<ffi::AnyBuffer> g_y0,
                        int64_t length, int64_t chunk) {
  const CoefBuffers c{{&m11, &m12, &m21, &m22, &f1, &f2}};
  Sizes s;
  bool has_flags, varying;
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckCommon(c, v, fl, z0, y0, length, chunk, &s, &has_flags, &varying));
  const ffi::DataType dt = v.element_type();
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(ys, "ys", {s.n * s.l, s.q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(z_ck, "z_ck", {s.n, s.chunks, s.q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(g_ys, "g_ys", {s.n * s.l, s.q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(g_zl, "g_zl", {s.n, s.q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_v, "g_v", {s.n * s.l, s.q}, dt));
  if (varying) {
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_c, "g_coeffs", {6, s.n * s.l, s.q}, dt));
  } else {
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_c, "g_coeffs", {s.n, 6, s.q}, dt));
  }
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_z0, "g_z0", {s.n, s.q}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_y0, "g_y0", {s.n, s.q}, dt));
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  WithElementType(dt, has_flags, varying, [&](auto zero, auto with_flags, auto per_step) {
    using T = decltype(zero);
    ParallelFor(pool, s.items(), [&](int64_t i) {
      BackwardItem<T, decltype(with_flags)::value, decltype(per_step)::value>(
          s, c.typed<T>(), v.typed_data<T>(), flags, z0.typed_data<T>(),
          y0.typed_data<T>(), ys.typed_data<T>(), z_ck.typed_data<T>(), g_ys.typed_data<T>(),
          g_zl.typed_data<T>(), g_v->typed_data<T>(), g_c->typed_data<T>(),
          g_z0->typed_data<T>(), g_y0->typed_data<T>(), i);
    });
  });
  return ffi::Error::Success();
}

// The context and the ten arguments both kernels take, in this order.
auto BindCommon() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()   // m11 [Q], or per step [N * L, Q]
      .Arg<ffi::AnyBuffer>()   // m12
      .Arg<ffi::AnyBuffer>()   // m21
      .Arg<ffi::AnyBuffer>()   // m22
      .Arg<ffi::AnyBuffer>()   // f1
      .Arg<ffi::AnyBuffer>()   // f2
      .Arg<ffi::AnyBuffer>()   // v [N * L, Q]
      .Arg<ffi::AnyBuffer>()   // flags [N * L] int8, or [0]
      .Arg<ffi::AnyBuffer>()   // z0 [N, Q]
      .Arg<ffi::AnyBuffer>();  // y0 [N, Q]
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossLtiForward, ForwardImpl,
                              BindCommon()
                                  .Ret<ffi::AnyBuffer>()  // ys [N * L, Q]
                                  .Ret<ffi::AnyBuffer>()  // z_last [N, Q]
                                  .Ret<ffi::AnyBuffer>()  // z_ck [N, chunks, Q]
                                  .Attr<int64_t>("length")
                                  .Attr<int64_t>("chunk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossLtiBackward, BackwardImpl,
                              BindCommon()
                                  .Arg<ffi::AnyBuffer>()  // ys [N * L, Q]
                                  .Arg<ffi::AnyBuffer>()  // z_ck [N, chunks, Q]
                                  .Arg<ffi::AnyBuffer>()  // g_ys [N * L, Q]
                                  .Arg<ffi::AnyBuffer>()  // g_zl [N, Q]
                                  .Ret<ffi::AnyBuffer>()  // g_v [N * L, Q]
                                  .Ret<ffi::AnyBuffer>()  // g_coeffs [N, 6, Q] / [6, N*L, Q]
                                  .Ret<ffi::AnyBuffer>()  // g_z0 [N, Q]
                                  .Ret<ffi::AnyBuffer>()  // g_y0 [N, Q]
                                  .Attr<int64_t>("length")
                                  .Attr<int64_t>("chunk"));
