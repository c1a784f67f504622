// Transparent huge pages for the large constant buffers a batch-1 pass streams: an allocator for those the
// kernels build at construction (the packed integer layout, q24_layout.h), and advice for the constant
// weights ORT holds (advise_large_pages).
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

// The same for a constant buffer the kernel reads but does not own (an initializer ORT allocated), in place:
// the whole 2 MiB pages inside [p, p + bytes) are moved onto huge pages now by MADV_COLLAPSE (Linux 6.1+), or
// advised MADV_HUGEPAGE for khugepaged to collapse later where the kernel lacks it. Contents and addresses do
// not change, and the partial pages at both ends are left alone, so no memory outside the buffer is touched or
// added. Any failure (file-backed memory, THP disabled, no free huge pages) leaves the buffer as it was.
// Returns the bytes advised (0: the buffer holds no whole huge page, or the OS has no such advice).
inline size_t advise_large_pages(const void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int kCollapse = 25;  // MADV_COLLAPSE, which older libc headers lack
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHugePageBytes - 1);
  if (end <= begin) return 0;
  void* const start = reinterpret_cast<void*>(begin);
  if (madvise(start, end - begin, kCollapse) != 0) madvise(start, end - begin, MADV_HUGEPAGE);
  return end - begin;
#else
  (void)p;
  (void)bytes;
  return 0;
#endif
}

}  // namespace salr
