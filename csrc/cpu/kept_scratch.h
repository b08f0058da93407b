// Per-thread scratch kept between kernel calls: the CPU launchers' packed operands, decoded panels
// and accumulators (never a copy of W). A fresh allocation costs a page fault and a zeroing per
// 4 KB on every call, so each thread keeps one 64-byte aligned buffer per KeptBuf (a thread_local
// of the caller's) up to kKeepScratchBytes and reuses it; larger requests live for the call only.
// Contents are uninitialised: callers write every element they read.
// Plain C++ in an anonymous namespace: each file, baseline or ISA-flagged, has its own copy.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace nf4lora {
namespace {

constexpr size_t kKeepScratchBytes = size_t{64} << 20;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// One kept buffer (declare it thread_local).
struct KeptBuf {
  std::unique_ptr<void, FreeDeleter> p;
  size_t bytes = 0;
};

// `count` elements of T from `kept` (grown if needed) or, above kKeepScratchBytes, owned by this
// object; get() is null when the allocation failed.
template <typename T>
class KeptScratch {
 public:
  KeptScratch(KeptBuf& kept, int64_t count) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    if (bytes > kKeepScratchBytes) {
      own_.reset(std::aligned_alloc(64, bytes));
      ptr_ = static_cast<T*>(own_.get());
      return;
    }
    if (bytes > kept.bytes) {
      kept.p.reset(std::aligned_alloc(64, bytes));
      kept.bytes = kept.p ? bytes : 0;
    }
    ptr_ = static_cast<T*>(kept.p.get());
  }
  T* get() const { return ptr_; }
  bool ok() const { return ptr_ != nullptr; }

 private:
  std::unique_ptr<void, FreeDeleter> own_;
  T* ptr_ = nullptr;
};

}  // namespace
}  // namespace nf4lora
