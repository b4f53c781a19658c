// Locks and atomics on memory that several processes map (the store's shared-memory windows),
// taken by the CPU. An MPI passive-target lock on a shared-memory window is taken in shared
// memory by Open MPI, but granted by the owner's progress engine on MPICH and Intel MPI: a
// worker then waits until the shard's owner next calls MPI. These need no MPI call and no owner.
//
// A reader-writer lock is one uint64: the number of shared holders in the low bits, kWriter
// while an exclusive holder has it, kWaiting while an exclusive waiter bars new shared holders
// (so that a stream of readers cannot starve a writer). Acquire and release orderings make the
// holder's loads and stores visible to the next holder. A waiter spins briefly, then yields
// its core (ranks may outnumber cores), then sleeps in short naps.
// Plain C ABI, no Python headers; loaded with ctypes by hpctrain/async_/shm.py.

#include <sched.h>
#include <time.h>

#include <cstdint>

namespace {

constexpr uint64_t kWriter = uint64_t{1} << 62;
constexpr uint64_t kWaiting = uint64_t{1} << 61;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spin, then yield, then nap 20 us at a time.
class Backoff {
 public:
  void operator()() {
    if (n_ < 64) {
      cpu_relax();
    } else if (n_ < 64 + 256) {
      sched_yield();
    } else {
      const timespec nap{0, 20000};
      nanosleep(&nap, nullptr);
    }
    ++n_;
  }

 private:
  int n_ = 0;
};

inline uint64_t load(const uint64_t* word) { return __atomic_load_n(word, __ATOMIC_RELAXED); }

inline bool swap(uint64_t* word, uint64_t expected, uint64_t desired) {
  return __atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED);
}

}  // namespace

extern "C" {

void hpctrain_shm_lock_shared(uint64_t* word) {
  Backoff wait;
  for (;;) {
    const uint64_t s = load(word);
    if (!(s & (kWriter | kWaiting)) && swap(word, s, s + 1)) return;
    wait();
  }
}

void hpctrain_shm_unlock_shared(uint64_t* word) {
  __atomic_fetch_sub(word, 1, __ATOMIC_RELEASE);
}

void hpctrain_shm_lock_exclusive(uint64_t* word) {
  Backoff wait;
  for (;;) {
    const uint64_t s = load(word);
    if ((s & ~kWaiting) == 0) {  // free (maybe with waiters flagged, this one among them)
      if (swap(word, s, kWriter)) return;
      continue;
    }
    if (!(s & kWaiting)) swap(word, s, s | kWaiting);  // bar new readers; failure is harmless
    wait();
  }
}

void hpctrain_shm_unlock_exclusive(uint64_t* word) {
  __atomic_store_n(word, uint64_t{0}, __ATOMIC_RELEASE);  // other waiters flag themselves again
}

// dst[i] += src[i] for i < n and *count += 1, as one step under the spin lock `lock` (as
// Open MPI's osc/sm makes an Accumulate atomic): concurrent accumulates lose nothing.
void hpctrain_shm_accumulate(uint64_t* lock, float* dst, const float* src, int64_t n,
                             int64_t* count) {
  hpctrain_shm_lock_exclusive(lock);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  __atomic_fetch_add(count, 1, __ATOMIC_RELAXED);
  hpctrain_shm_unlock_exclusive(lock);
}

int64_t hpctrain_shm_fetch_add(int64_t* word, int64_t value) {
  return __atomic_fetch_add(word, value, __ATOMIC_SEQ_CST);
}

// desired into *word if it holds expected; what it held (expected: the swap happened).
int64_t hpctrain_shm_compare_swap(int64_t* word, int64_t expected, int64_t desired) {
  __atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_SEQ_CST,
                              __ATOMIC_SEQ_CST);
  return expected;
}

// Each of n int64 words read atomically (a torn value is never seen; no order among them).
void hpctrain_shm_load(const int64_t* words, int64_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __atomic_load_n(words + i, __ATOMIC_ACQUIRE);
}

void hpctrain_shm_store(int64_t* word, int64_t value) {
  __atomic_store_n(word, value, __ATOMIC_RELEASE);
}

}  // extern "C"
