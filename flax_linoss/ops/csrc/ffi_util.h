// What the flax_linoss CPU kernels share (lti_recurrence.cc, outer_recurrence.cc): a
// parallel loop over XLA's intra-op thread pool and argument checks.

#ifndef FLAX_LINOSS_FFI_UTIL_H_
#define FLAX_LINOSS_FFI_UTIL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace flax_linoss {

namespace ffi = xla::ffi;

// Bits of the per-step flag codes (one int8 per batch row and step): a masked step holds
// the state; a segment start zeroes it before the step.
constexpr int8_t kHold = 1;
constexpr int8_t kReset = 2;

// Runs fn(i) for i in [0, items) on the caller and the pool's threads. Items are claimed
// from a shared counter, so the caller never waits on a task that has not started: if the
// pool is busy, the caller does all the work itself.
template <typename F>
inline void ParallelFor(ffi::ThreadPool& pool, int64_t items, const F& fn) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), items);
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  // A task that starts late finds no item left and touches only `shared`, which its own
  // reference keeps alive; it never calls `fn` after the caller has returned.
  auto work = [shared, items, &fn]() {
    int64_t mine = 0;
    for (int64_t i; (i = shared->next.fetch_add(1)) < items; ++mine) fn(i);
    if (mine > 0 && shared->done.fetch_add(mine) + mine == items) {
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == items; });
}

inline ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("flax_linoss recurrence kernel: " + what);
}

// Checks that `x` has dtype `dt` and dimensions `want`.
inline ffi::Error CheckDims(const ffi::AnyBuffer& x, const char* name,
                     std::initializer_list<int64_t> want, ffi::DataType dt) {
  auto dims = x.dimensions();
  bool ok = x.element_type() == dt && static_cast<size_t>(dims.size()) == want.size();
  int64_t i = 0;
  for (int64_t d : want) ok = ok && dims[i++] == d;
  if (!ok) return Invalid(std::string("`") + name + "` has the wrong shape or dtype.");
  return ffi::Error::Success();
}

#define FLAX_LINOSS_RETURN_IF_ERROR(expr) \
  do {                                    \
    ffi::Error err_ = (expr);             \
    if (err_.failure()) return err_;      \
  } while (0)

// Calls fn(T{}, std::bool_constant<has_flags>{}) with T double for F64, else float (the
// kernels check for float32 or float64 first): one instantiation per type and flag presence.
template <typename F>
inline void WithTypeAndFlags(ffi::DataType dt, bool has_flags, const F& fn) {
  auto with_flags = [&](auto zero) {
    if (has_flags) {
      fn(zero, std::true_type{});
    } else {
      fn(zero, std::false_type{});
    }
  };
  if (dt == ffi::DataType::F64) {
    with_flags(double{});
  } else {
    with_flags(float{});
  }
}

// Calls fn(std::integral_constant<int64_t, n>{}) for the sizes the kernels unroll loops
// for (n = 16, 32, 64), else fn(std::integral_constant<int64_t, 0>{}) (a runtime size).
template <typename F>
inline void WithUnrolledSize(int64_t n, const F& fn) {
  switch (n) {
    case 16:
      return fn(std::integral_constant<int64_t, 16>{});
    case 32:
      return fn(std::integral_constant<int64_t, 32>{});
    case 64:
      return fn(std::integral_constant<int64_t, 64>{});
    default:
      return fn(std::integral_constant<int64_t, 0>{});
  }
}

}  // namespace flax_linoss

#endif  // FLAX_LINOSS_FFI_UTIL_H_
