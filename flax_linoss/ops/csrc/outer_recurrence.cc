// Fused CPU kernels for the outer-product oscillator recurrence (flax_linoss/ops/outer.py),
// called from JAX as XLA FFI custom calls (flax_linoss/ops/_scans/native.py compiles and
// registers them with the LinOSS recurrence's kernels).
//
// Per batch row n and head h, a K x V state of oscillators, each a 2-vector (z, y) with the
// 2x2 transition M_i and forcing f_i of its key dim i (time-invariant, [H, K] each), driven
// by k_t[i] v_t[j] and read by q_t through the readout (cz_i, cy_i):
//
//   z_t[i, j] = m11_i z_{t-1}[i, j] + m12_i y_{t-1}[i, j] + f1_i k_t[i] v_t[j]
//   y_t[i, j] = m21_i z_{t-1}[i, j] + m22_i y_{t-1}[i, j] + f2_i k_t[i] v_t[j]
//   o_t[j]    = sum_i q_t[i] (cz_i z_t[i, j] + cy_i y_t[i, j])
//
// Flags as in lti_recurrence.cc: a reset zeroes the state before the step, a held step
// leaves it unchanged (its output is read from the held state).
//
// OuterForward writes o, the final state and the state before every chunk of `chunk` steps
// (a checkpoint). OuterBackward walks the chunks from last to first: it recomputes the
// chunk's states from its checkpoint into a buffer that stays in cache, then runs the
// adjoint recurrence backwards through the chunk,
//
//   lambda_t = (q_t[i] (cz_i, cy_i) g_o_t[j]) + M_{t+1}^T lambda_{t+1},  from the final
//   state's cotangent,
//
// accumulating the gradients of q, k, v, the six coefficients, the readout and the initial
// state in the same pass. Work items are (batch row, head) pairs on XLA's intra-op thread
// pool; an item streams over time with its K x V state in small arrays. Float32 and
// float64.

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

namespace {

struct Sizes {
  int64_t n, l, h, kd, vd, chunk, chunks;
  int64_t kv() const { return kd * vd; }
  // Offsets of (n, t, h) in [N, L, H, K] and [N, L, H, V] arrays.
  int64_t qk_at(int64_t b, int64_t t, int64_t head) const { return ((b * l + t) * h + head) * kd; }
  int64_t v_at(int64_t b, int64_t t, int64_t head) const { return ((b * l + t) * h + head) * vd; }
  // Offset of the (n, h) state in [N, H, K, V] arrays, and of a checkpoint (z, then y) in
  // [N, H, chunks, 2, K, V].
  int64_t state(int64_t b, int64_t head) const { return (b * h + head) * kv(); }
  int64_t ck(int64_t b, int64_t head, int64_t c) const {
    return ((b * h + head) * chunks + c) * 2 * kv();
  }
};

// The value dims per head: kV where the kernel is compiled for it (inner loops of a known
// length, unrolled), else the runtime size (kV = 0).
template <int64_t kV>
inline int64_t Width(const Sizes& s) {
  return kV > 0 ? kV : s.vd;
}

// The per-(head, key dim) coefficients of one head: m11, m12, m21, m22, f1, f2, cz, cy.
template <typename T>
struct Coefs {
  const T* p[8];
  Coefs at(int64_t head, int64_t kd) const {
    Coefs c;
    for (int a = 0; a < 8; ++a) c.p[a] = p[a] + head * kd;
    return c;
  }
};

// One step of the state of a head from (z, y) into (zn, yn) (which may be z, y), without
// flags ([K, V] layout; StepT is the same expression on the backward pass's [V, K] layout,
// so it recomputes the forward pass's states up to the compiler's contractions).
template <typename T, int64_t kV>
inline void Advance(const Sizes& s, const Coefs<T>& c, const T* kt, const T* vt, const T* z,
                    const T* y, T* zn, T* yn) {
  const int64_t vd = Width<kV>(s);
  for (int64_t i = 0; i < s.kd; ++i) {
    const T m11 = c.p[0][i], m12 = c.p[1][i], m21 = c.p[2][i], m22 = c.p[3][i];
    const T a = c.p[4][i] * kt[i], b = c.p[5][i] * kt[i];
    const T* zi = z + i * vd;
    const T* yi = y + i * vd;
    T* zo = zn + i * vd;
    T* yo = yn + i * vd;
#pragma GCC ivdep
    for (int64_t j = 0; j < vd; ++j) {
      const T zj = zi[j], yj = yi[j];
      zo[j] = m11 * zj + m12 * yj + a * vt[j];
      yo[j] = m21 * zj + m22 * yj + b * vt[j];
    }
  }
}

// Partial sums per sum (one vector register; a fixed order, so results are reproducible).
constexpr int64_t kLanes = 8;

// sum_i x[i], in kLanes partial sums.
template <typename T>
inline T Sum(const T* x, int64_t n) {
  T part[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
#pragma GCC ivdep
    for (int64_t u = 0; u < kLanes; ++u) part[u] += x[i + u];
  }
  for (int64_t u = 0; u < n - whole; ++u) part[u] += x[whole + u];
  T total = T(0);
  for (int64_t u = 0; u < kLanes; ++u) total += part[u];
  return total;
}

// o_t[j] = sum_i q_t[i] (cz_i z[i, j] + cy_i y[i, j]).
template <typename T, int64_t kV>
inline void Read(const Sizes& s, const Coefs<T>& c, const T* qt, const T* z, const T* y,
                 T* ot) {
  const int64_t vd = Width<kV>(s);
  for (int64_t j = 0; j < vd; ++j) ot[j] = T(0);
  for (int64_t i = 0; i < s.kd; ++i) {
    const T qz = qt[i] * c.p[6][i], qy = qt[i] * c.p[7][i];
    const T* zi = z + i * vd;
    const T* yi = y + i * vd;
#pragma GCC ivdep
    for (int64_t j = 0; j < vd; ++j) ot[j] += qz * zi[j] + qy * yi[j];
  }
}

// The state after step t from the state before it, with the step's flag code.
template <typename T, bool kFlags, int64_t kV>
inline void Step(const Sizes& s, const Coefs<T>& c, int8_t code, const T* kt, const T* vt,
                 const T* z, const T* y, T* zn, T* yn) {
  if (kFlags && (code & kReset)) {
    std::fill(zn, zn + s.kv(), T(0));
    std::fill(yn, yn + s.kv(), T(0));
    if (code & kHold) return;
    Advance<T, kV>(s, c, kt, vt, zn, yn, zn, yn);
    return;
  }
  if (kFlags && (code & kHold)) {
    if (zn != z) std::copy(z, z + s.kv(), zn);
    if (yn != y) std::copy(y, y + s.kv(), yn);
    return;
  }
  Advance<T, kV>(s, c, kt, vt, z, y, zn, yn);
}

template <typename T, bool kFlags, int64_t kV>
void ForwardItem(const Sizes& s, const Coefs<T>& all, const T* q, const T* k, const T* v,
                 const int8_t* fl, const T* z0, const T* y0, T* o, T* z_last, T* y_last, T* ck,
                 int64_t item) {
  const int64_t b = item / s.h, head = item % s.h;
  const Coefs<T> c = all.at(head, s.kd);
  const int64_t kv = s.kv();
  std::vector<T> z(z0 + s.state(b, head), z0 + s.state(b, head) + kv);
  std::vector<T> y(y0 + s.state(b, head), y0 + s.state(b, head) + kv);
  for (int64_t t = 0; t < s.l; ++t) {
    if (t % s.chunk == 0) {
      T* out = ck + s.ck(b, head, t / s.chunk);
      std::copy(z.begin(), z.end(), out);
      std::copy(y.begin(), y.end(), out + kv);
    }
    const int8_t code = kFlags ? fl[b * s.l + t] : 0;
    Step<T, kFlags, kV>(s, c, code, k + s.qk_at(b, t, head), v + s.v_at(b, t, head), z.data(),
                    y.data(), z.data(), y.data());
    Read<T, kV>(s, c, q + s.qk_at(b, t, head), z.data(), y.data(), o + s.v_at(b, t, head));
  }
  std::copy(z.begin(), z.end(), z_last + s.state(b, head));
  std::copy(y.begin(), y.end(), y_last + s.state(b, head));
}

// The backward pass keeps the state transposed, [V, K] (value dim j, then key dim i), so
// that its sums over the value dims (the read's gradient for q, the forcing's for k) run
// across vectors over the key dims instead of one horizontal sum per key dim; only the
// gradient of v sums over the key dims. (Unrolling its loops for fixed sizes, as the
// forward pass does, measured slower here.)

// dst[j * K + i] = src[i * V + j]: a head's state from [K, V] to [V, K] (back with the sizes
// swapped).
template <typename T>
inline void Transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
  }
}

// The state after step t from the state before it ([V, K] layout), with the step's flags.
template <typename T, bool kFlags>
inline void StepT(const Sizes& s, const Coefs<T>& c, int8_t code, const T* kt, const T* vt,
                  const T* z, const T* y, T* zn, T* yn, T* f1k, T* f2k) {
  const int64_t kd = s.kd;
  if (kFlags && (code & kHold)) {
    if (code & kReset) {
      std::fill(zn, zn + s.kv(), T(0));
      std::fill(yn, yn + s.kv(), T(0));
    } else {
      std::copy(z, z + s.kv(), zn);
      std::copy(y, y + s.kv(), yn);
    }
    return;
  }
  const T keep = (kFlags && (code & kReset)) ? T(0) : T(1);
  for (int64_t i = 0; i < kd; ++i) {
    f1k[i] = c.p[4][i] * kt[i];
    f2k[i] = c.p[5][i] * kt[i];
  }
  for (int64_t j = 0; j < s.vd; ++j) {
    const T* zj = z + j * kd;
    const T* yj = y + j * kd;
    T* zo = zn + j * kd;
    T* yo = yn + j * kd;
    const T vj = vt[j];
#pragma GCC ivdep
    for (int64_t i = 0; i < kd; ++i) {
      const T zi = keep * zj[i], yi = keep * yj[i];
      zo[i] = c.p[0][i] * zi + c.p[1][i] * yi + f1k[i] * vj;
      yo[i] = c.p[2][i] * zi + c.p[3][i] * yi + f2k[i] * vj;
    }
  }
}

// g_c is [N, 8, H, K]: each batch row's sums of the eight coefficient gradients (m11, m12,
// m21, m22, f1, f2, cz, cy), summed over the rows in JAX.
template <typename T, bool kFlags>
void BackwardItem(const Sizes& s, const Coefs<T>& all, const T* q, const T* k, const T* v,
                  const int8_t* fl, const T* ck, const T* g_o, const T* g_zl, const T* g_yl,
                  T* g_q, T* g_k, T* g_v, T* g_c, T* g_z0, T* g_y0, int64_t item) {
  const int64_t b = item / s.h, head = item % s.h;
  const Coefs<T> c = all.at(head, s.kd);
  const int64_t kv = s.kv(), kd = s.kd, vd = s.vd;
  // Row r of zbuf / ybuf: the state after step t0 + r - 1 of the chunk [t0, t1); row 0 the
  // state before the chunk (its checkpoint). All [V, K].
  std::vector<T> zbuf((s.chunk + 1) * kv), ybuf((s.chunk + 1) * kv);
  std::vector<T> lz(kv), ly(kv);
  Transpose(g_zl + s.state(b, head), kd, vd, lz.data());
  Transpose(g_yl + s.state(b, head), kd, vd, ly.data());
  // Per (j, i) sums of the transition's gradients; per i those of f and the readout.
  std::vector<T> acc_m(4 * kv, T(0)), acc_i(4 * kd, T(0));
  // Per-step vectors over the key dims.
  std::vector<T> work(9 * kd);
  T* rz = work.data();
  T* ry = rz + kd;
  T* uz = ry + kd;
  T* uy = uz + kd;
  T* qz = uy + kd;
  T* qy = qz + kd;
  T* w1 = qy + kd;
  T* w2 = w1 + kd;
  T* tmp = w2 + kd;
  for (int64_t ci = s.chunks - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * s.chunk;
    const int64_t t1 = std::min(s.l, t0 + s.chunk);
    const T* start = ck + s.ck(b, head, ci);
    Transpose(start, kd, vd, zbuf.data());
    Transpose(start + kv, kd, vd, ybuf.data());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t - t0;
      const int8_t code = kFlags ? fl[b * s.l + t] : 0;
      StepT<T, kFlags>(s, c, code, k + s.qk_at(b, t, head), v + s.v_at(b, t, head),
                      zbuf.data() + r * kv, ybuf.data() + r * kv, zbuf.data() + (r + 1) * kv,
                      ybuf.data() + (r + 1) * kv, w1, w2);
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t r = t - t0;
      const int8_t code = kFlags ? fl[b * s.l + t] : 0;
      const T* zc = zbuf.data() + (r + 1) * kv;  // the state after the step
      const T* yc = ybuf.data() + (r + 1) * kv;
      const T* zp = zbuf.data() + r * kv;  // before it (before a reset)
      const T* yp = ybuf.data() + r * kv;
      const T* qt = q + s.qk_at(b, t, head);
      const T* kt = k + s.qk_at(b, t, head);
      const T* vt = v + s.v_at(b, t, head);
      const T* go = g_o + s.v_at(b, t, head);
      T* gq = g_q + s.qk_at(b, t, head);
      T* gk = g_k + s.qk_at(b, t, head);
      T* gv = g_v + s.v_at(b, t, head);
      // The read, o_t[j] = sum_i q_t[i] (cz_i z_t[j, i] + cy_i y_t[j, i]): its gradients
      // for q and the readout, and what it adds to lambda_t.
#pragma GCC ivdep
      for (int64_t i = 0; i < kd; ++i) {
        rz[i] = ry[i] = T(0);
        qz[i] = qt[i] * c.p[6][i];
        qy[i] = qt[i] * c.p[7][i];
      }
      for (int64_t j = 0; j < vd; ++j) {
        const T gj = go[j];
        const T* zj = zc + j * kd;
        const T* yj = yc + j * kd;
        T* lzj = lz.data() + j * kd;
        T* lyj = ly.data() + j * kd;
#pragma GCC ivdep
        for (int64_t i = 0; i < kd; ++i) {
          rz[i] += gj * zj[i];
          ry[i] += gj * yj[i];
          lzj[i] += gj * qz[i];
          lyj[i] += gj * qy[i];
        }
      }
#pragma GCC ivdep
      for (int64_t i = 0; i < kd; ++i) {
        gq[i] = c.p[6][i] * rz[i] + c.p[7][i] * ry[i];
        acc_i[2 * kd + i] += qt[i] * rz[i];
        acc_i[3 * kd + i] += qt[i] * ry[i];
      }
      const bool reset = kFlags && (code & kReset);
      if (kFlags && (code & kHold)) {  // the state passed through unchanged, nothing forced
        std::fill(gk, gk + kd, T(0));
        std::fill(gv, gv + vd, T(0));
        if (reset) {
          std::fill(lz.begin(), lz.end(), T(0));
          std::fill(ly.begin(), ly.end(), T(0));
        }
        continue;
      }
      // Back through the step: the forcing's gradients, then lambda_{t-1} = M^T lambda_t.
#pragma GCC ivdep
      for (int64_t i = 0; i < kd; ++i) {
        uz[i] = uy[i] = T(0);
        w1[i] = kt[i] * c.p[4][i];
        w2[i] = kt[i] * c.p[5][i];
      }
      const T keep = reset ? T(0) : T(1);  // a reset: the state before was zero
      for (int64_t j = 0; j < vd; ++j) {
        const T vj = vt[j];
        T* lzj = lz.data() + j * kd;
        T* lyj = ly.data() + j * kd;
        const T* zj = zp + j * kd;
        const T* yj = yp + j * kd;
        T* a11 = acc_m.data() + j * kd;
        T* a12 = a11 + kv;
        T* a21 = a12 + kv;
        T* a22 = a21 + kv;
#pragma GCC ivdep
        for (int64_t i = 0; i < kd; ++i) {
          const T l1 = lzj[i], l2 = lyj[i];
          uz[i] += vj * l1;
          uy[i] += vj * l2;
          tmp[i] = w1[i] * l1 + w2[i] * l2;  // summed into g_v[j] below
          const T zi = keep * zj[i], yi = keep * yj[i];
          a11[i] += l1 * zi;
          a12[i] += l1 * yi;
          a21[i] += l2 * zi;
          a22[i] += l2 * yi;
          lzj[i] = keep * (c.p[0][i] * l1 + c.p[2][i] * l2);
          lyj[i] = keep * (c.p[1][i] * l1 + c.p[3][i] * l2);
        }
        gv[j] = Sum(tmp, kd);
      }
#pragma GCC ivdep
      for (int64_t i = 0; i < kd; ++i) {
        gk[i] = c.p[4][i] * uz[i] + c.p[5][i] * uy[i];
        acc_i[i] += kt[i] * uz[i];
        acc_i[kd + i] += kt[i] * uy[i];
      }
    }
  }
  // g_c row b: [8, H, K]; the transition's sums over the value dims.
  T* out = g_c + b * 8 * s.h * kd + head * kd;
  for (int a = 0; a < 4; ++a) {
    T* row = out + a * s.h * kd;
    for (int64_t i = 0; i < kd; ++i) row[i] = T(0);
    for (int64_t j = 0; j < vd; ++j) {
      const T* aj = acc_m.data() + a * kv + j * kd;
      for (int64_t i = 0; i < kd; ++i) row[i] += aj[i];
    }
  }
  for (int a = 0; a < 4; ++a) {
    for (int64_t i = 0; i < kd; ++i) out[(4 + a) * s.h * kd + i] = acc_i[a * kd + i];
  }
  Transpose(lz.data(), vd, kd, g_z0 + s.state(b, head));
  Transpose(ly.data(), vd, kd, g_y0 + s.state(b, head));
}

// Sizes from q ([N * L, H * K]), v ([N * L, H * V]) and the attributes; checks every
// argument both kernels take.
ffi::Error CheckCommon(const ffi::AnyBuffer* coefs[8], const ffi::AnyBuffer& q,
                       const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                       const ffi::AnyBuffer& fl, const ffi::AnyBuffer& ck, int64_t length,
                       int64_t heads, int64_t chunk, Sizes* s, bool* has_flags) {
  auto dq = q.dimensions();
  auto dv = v.dimensions();
  if (dq.size() != 2 || dv.size() != 2) return Invalid("`q` and `v` must be 2-d rows.");
  if (length < 1 || dq[0] % length != 0) return Invalid("`length` must divide N * L.");
  if (heads < 1 || dq[1] % heads != 0 || dv[1] % heads != 0) {
    return Invalid("`heads` must divide the features of q and v.");
  }
  if (chunk < 1) return Invalid("`chunk` must be >= 1.");
  *s = Sizes{dq[0] / length, length, heads, dq[1] / heads, dv[1] / heads, chunk,
             (length + chunk - 1) / chunk};
  const ffi::DataType dt = q.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::F64) {
    return Invalid("float32 or float64 only.");
  }
  for (int a = 0; a < 8; ++a) {
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*coefs[a], "coefficients", {s->h * s->kd}, dt));
  }
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(k, "k", {s->n * s->l, s->h * s->kd}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(v, "v", {s->n * s->l, s->h * s->vd}, dt));
  *has_flags = fl.element_count() > 0;
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckDims(fl, "flags", {*has_flags ? s->n * s->l : 0}, ffi::DataType::S8));
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckDims(ck, "checkpoints", {s->n, s->h, s->chunks, 2, s->kd, s->vd}, dt));
  return ffi::Error::Success();
}

// Calls fn(T{}, std::bool_constant<flags>{}, std::integral_constant<int64_t, n>{}) with T
// float or double and n the size the kernel unrolls its inner loops for (0: none).
template <typename F>
void Dispatch(ffi::DataType dt, bool has_flags, int64_t n, const F& fn) {
  flax_linoss::WithTypeAndFlags(dt, has_flags, [&](auto zero, auto flags) {
    flax_linoss::WithUnrolledSize(n, [&](auto size) { fn(zero, flags, size); });
  });
}

template <typename T>
Coefs<T> Typed(const ffi::AnyBuffer* b[8]) {
  Coefs<T> c;
  for (int a = 0; a < 8; ++a) c.p[a] = b[a]->typed_data<T>();
  return c;
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer m11, ffi::AnyBuffer m12,
                       ffi::AnyBuffer m21, ffi::AnyBuffer m22, ffi::AnyBuffer f1,
                       ffi::AnyBuffer f2, ffi::AnyBuffer cz, ffi::AnyBuffer cy,
                       ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer fl,
                       ffi::AnyBuffer z0, ffi::AnyBuffer y0, ffi::Result<ffi::AnyBuffer> o,
                       ffi::Result<ffi::AnyBuffer> z_last, ffi::Result<ffi::AnyBuffer> y_last,
                       ffi::Result<ffi::AnyBuffer> ck, int64_t length, int64_t heads,
                       int64_t chunk) {
  const ffi::AnyBuffer* coefs[8] = {&m11, &m12, &m21, &m22, &f1, &f2, &cz, &cy};
  Sizes s;
  bool has_flags;
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckCommon(coefs, q, k, v, fl, *ck, length, heads, chunk, &s, &has_flags));
  const ffi::DataType dt = q.element_type();
  for (const ffi::AnyBuffer* x : {&z0, &y0, &*z_last, &*y_last}) {
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*x, "state", {s.n, s.h, s.kd, s.vd}, dt));
  }
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*o, "o", {s.n * s.l, s.h * s.vd}, dt));
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  Dispatch(dt, has_flags, s.vd, [&](auto zero, auto with_flags, auto width) {
    using T = decltype(zero);
    const Coefs<T> c = Typed<T>(coefs);
    ParallelFor(pool, s.n * s.h, [&](int64_t i) {
      ForwardItem<T, decltype(with_flags)::value, decltype(width)::value>(
          s, c, q.typed_data<T>(), k.typed_data<T>(), v.typed_data<T>(), flags,
          z0.typed_data<T>(), y0.typed_data<T>(), o->typed_data<T>(), z_last->typed_data<T>(),
          y_last->typed_data<T>(), ck->typed_data<T>(), i);
    });
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer m11, ffi::AnyBuffer m12,
                        ffi::AnyBuffer m21, ffi::AnyBuffer m22, ffi::AnyBuffer f1,
                        ffi::AnyBuffer f2, ffi::AnyBuffer cz, ffi::AnyBuffer cy,
                        ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer fl, ffi::AnyBuffer ck, ffi::AnyBuffer g_o,
                        ffi::AnyBuffer g_zl, ffi::AnyBuffer g_yl,
                        ffi::Result<ffi::AnyBuffer> g_q, ffi::Result<ffi::AnyBuffer> g_k,
                        ffi::Result<ffi::AnyBuffer> g_v, ffi::Result<ffi::AnyBuffer> g_c,
                        ffi::Result<ffi::AnyBuffer> g_z0, ffi::Result<ffi::AnyBuffer> g_y0,
                        int64_t length, int64_t heads, int64_t chunk) {
  const ffi::AnyBuffer* coefs[8] = {&m11, &m12, &m21, &m22, &f1, &f2, &cz, &cy};
  Sizes s;
  bool has_flags;
  FLAX_LINOSS_RETURN_IF_ERROR(
      CheckCommon(coefs, q, k, v, fl, ck, length, heads, chunk, &s, &has_flags));
  const ffi::DataType dt = q.element_type();
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(g_o, "g_o", {s.n * s.l, s.h * s.vd}, dt));
  for (const ffi::AnyBuffer* x : {&g_zl, &g_yl, &*g_z0, &*g_y0}) {
    FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*x, "state", {s.n, s.h, s.kd, s.vd}, dt));
  }
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_q, "g_q", {s.n * s.l, s.h * s.kd}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_k, "g_k", {s.n * s.l, s.h * s.kd}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_v, "g_v", {s.n * s.l, s.h * s.vd}, dt));
  FLAX_LINOSS_RETURN_IF_ERROR(CheckDims(*g_c, "g_coefficients", {s.n, 8, s.h * s.kd}, dt));
  const int8_t* flags = has_flags ? fl.typed_data<int8_t>() : nullptr;
  flax_linoss::WithTypeAndFlags(dt, has_flags, [&](auto zero, auto with_flags) {
    using T = decltype(zero);
    const Coefs<T> c = Typed<T>(coefs);
    ParallelFor(pool, s.n * s.h, [&](int64_t i) {
      BackwardItem<T, decltype(with_flags)::value>(
          s, c, q.typed_data<T>(), k.typed_data<T>(), v.typed_data<T>(), flags,
          ck.typed_data<T>(), g_o.typed_data<T>(), g_zl.typed_data<T>(), g_yl.typed_data<T>(),
          g_q->typed_data<T>(), g_k->typed_data<T>(), g_v->typed_data<T>(),
          g_c->typed_data<T>(), g_z0->typed_data<T>(), g_y0->typed_data<T>(), i);
    });
  });
  return ffi::Error::Success();
}

// The context and the twelve arguments both kernels take, in this order.
auto BindCommon() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()   // m11 [H * K]
      .Arg<ffi::AnyBuffer>()   // m12
      .Arg<ffi::AnyBuffer>()   // m21
      .Arg<ffi::AnyBuffer>()   // m22
      .Arg<ffi::AnyBuffer>()   // f1
      .Arg<ffi::AnyBuffer>()   // f2
      .Arg<ffi::AnyBuffer>()   // cz (readout of the velocity)
      .Arg<ffi::AnyBuffer>()   // cy (readout of the position)
      .Arg<ffi::AnyBuffer>()   // q [N * L, H * K]
      .Arg<ffi::AnyBuffer>()   // k [N * L, H * K]
      .Arg<ffi::AnyBuffer>()   // v [N * L, H * V]
      .Arg<ffi::AnyBuffer>();  // flags [N * L] int8, or [0]
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossOuterForward, ForwardImpl,
                              BindCommon()
                                  .Arg<ffi::AnyBuffer>()  // z0 [N, H, K, V]
                                  .Arg<ffi::AnyBuffer>()  // y0 [N, H, K, V]
                                  .Ret<ffi::AnyBuffer>()  // o [N * L, H * V]
                                  .Ret<ffi::AnyBuffer>()  // z_last [N, H, K, V]
                                  .Ret<ffi::AnyBuffer>()  // y_last [N, H, K, V]
                                  .Ret<ffi::AnyBuffer>()  // checkpoints [N, H, C, 2, K, V]
                                  .Attr<int64_t>("length")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("chunk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxLinossOuterBackward, BackwardImpl,
                              BindCommon()
                                  .Arg<ffi::AnyBuffer>()  // checkpoints [N, H, C, 2, K, V]
                                  .Arg<ffi::AnyBuffer>()  // g_o [N * L, H * V]
                                  .Arg<ffi::AnyBuffer>()  // g_z_last [N, H, K, V]
                                  .Arg<ffi::AnyBuffer>()  // g_y_last [N, H, K, V]
                                  .Ret<ffi::AnyBuffer>()  // g_q [N * L, H * K]
                                  .Ret<ffi::AnyBuffer>()  // g_k [N * L, H * K]
                                  .Ret<ffi::AnyBuffer>()  // g_v [N * L, H * V]
                                  .Ret<ffi::AnyBuffer>()  // g_coefficients [N, 8, H * K]
                                  .Ret<ffi::AnyBuffer>()  // g_z0 [N, H, K, V]
                                  .Ret<ffi::AnyBuffer>()  // g_y0 [N, H, K, V]
                                  .Attr<int64_t>("length")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("chunk"));
