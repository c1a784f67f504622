// An allocator for the large constant buffers the kernels build at construction (the packed integer layout,
// q24_layout.h), backed by transparent huge pages where the OS offers them on request.
//
// A batch-1 pass streams such a buffer from DRAM once per call. With 4 KiB pages a 7 MB weight crosses ~1,700
// pages, each a TLB miss; a 2 MiB-aligned buffer advised MADV_HUGEPAGE takes ~4. Linux's default THP mode
// ("madvise") backs only advised ranges, so without the advice the buffer stays on small pages. Elsewhere (or
// with THP off) the advice is ignored and the buffer is an ordinary aligned allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace salr {

constexpr size_t kHugePageBytes = size_t{2} << 20;

template <class T>
struct LargePageAllocator {
  using value_type = T;
  LargePageAllocator() = default;
  template <class U>
  LargePageAllocator(const LargePageAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes < kHugePageBytes) {
      void* p = std::malloc(bytes ? bytes : 1);
      if (p == nullptr) throw std::bad_alloc();
      return static_cast<T*>(p);
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePageBytes, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // whole huge pages only: the tail past the last 2 MiB boundary stays on small pages (no memory wasted)
    madvise(p, bytes / kHugePageBytes * kHugePageBytes, MADV_HUGEPAGE);  // a hint; failure changes nothing
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }

  template <class U>
  bool operator==(const LargePageAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const LargePageAllocator<U>&) const noexcept { return false; }
};

using LargeBytes = std::vector<uint8_t, LargePageAllocator<uint8_t>>;

}  // namespace salr
