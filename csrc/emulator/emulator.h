// A CPU emulator for the extension's kernels, so their numerics can be tested without a GPU
// (tests/test_cuda_emulated.py). Compile the kernel headers with g++ -DLK_CPU_EMULATION and
// include this file first (csrc/device/portable.cuh does).
//
// Every CUDA thread is a fiber (its own stack, cooperative switching); the blocks of a grid run
// one after the other. Fibers switch only at synchronisation points, where the emulator enforces
// CUDA's rules instead of hiding mistakes:
//
// * __syncthreads / __syncwarp wait for every live thread of the block / warp; warp collectives
//   (shuffles, mma, ldmatrix) need all 32 lanes. A deadlock aborts with a message.
// * mma.m16n8k16 and ldmatrix (.trans) are computed from the PTX fragment layouts, so a layout
//   mistake gives wrong numbers; ldmatrix and cp.async check alignment and shared-memory bounds.
// * cp.async copies land either when the thread waits for their group (catches a read before
//   the wait) or at issue (catches an overwrite of a buffer other warps still read), and the
//   scheduler runs either the lowest or the highest runnable thread first, letting one warp run
//   as far ahead of the others as the barriers allow (catches a missing __syncthreads).
// * Dynamic shared memory starts filled with 0xff bytes (NaN in every float format).
//
// Single translation unit only (the context switch is defined in a top-level asm block).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace lk_emu {

struct Options {
  bool copy_at_issue = false;  // cp.async lands at issue instead of at the wait
  bool high_first = false;     // run the highest-numbered runnable thread first
};

inline Options& options() {
  static Options o;
  return o;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "lk_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

enum class Wait { none, warp, block };

struct Copy {
  void* dst;
  const void* src;
  int bytes;  // read from src
  int size;   // written to dst (the rest zero-filled)
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  Wait wait = Wait::none;
  bool done = false;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
};

struct Slot {  // what a lane hands to its warp in a collective
  uint32_t u[6];
  const void* ptr;
};

struct State {
  dim3 grid, block, bidx;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  std::vector<Slot> slots;
  std::vector<int> warp_waiting, warp_live;
  int block_waiting = 0, live = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<unsigned char> smem_store;
  int current = -1;
  void* sched_sp = nullptr;
  std::function<void()> body;
};

inline State& S() {
  static State s;
  return s;
}

constexpr size_t kStackBytes = 512 * 1024;

// ------------------------------------------------------------------ context switching
#if defined(__x86_64__)
extern "C" void lk_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl lk_emu_switch
.type lk_emu_switch,@function
lk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size lk_emu_switch,.-lk_emu_switch
)");

inline void fiber_entry();

inline void* initial_sp(char* stack) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                       // alignment slot (entry sees rsp % 16 == 8)
  *--sp = reinterpret_cast<void*>(&fiber_entry);         // "return address" of the first switch
  for (int i = 0; i < 6; ++i) *--sp = nullptr;           // rbp rbx r12 r13 r14 r15
  return sp;
}

inline void switch_to(void** save, void* load) { lk_emu_switch(save, load); }
#else
#error "lk_emu: only x86-64 is supported"
#endif

inline Fiber& self() { return S().fibers[S().current]; }

inline void yield_to_scheduler() {
  State& s = S();
  switch_to(&s.fibers[s.current].sp, s.sched_sp);
}

inline void fiber_entry() {
  State& s = S();
  s.body();
  Fiber& f = s.fibers[s.current];
  f.done = true;
  f.groups.clear();
  f.open.clear();
  s.live -= 1;
  s.warp_live[s.current / 32] -= 1;
  // A thread that exits releases barriers the others wait at only if they would release anyway.
  void* unused;
  switch_to(&unused, s.sched_sp);
  fail("a finished thread was resumed");
}

// ------------------------------------------------------------------ barriers
inline void release(Wait kind, int warp) {
  State& s = S();
  if (kind == Wait::warp) {
    for (int i = warp * 32; i < warp * 32 + 32 && i < s.nthreads; ++i)
      if (!s.fibers[i].done) s.fibers[i].wait = Wait::none;
    s.warp_waiting[warp] = 0;
  } else {
    for (auto& f : s.fibers)
      if (!f.done) f.wait = Wait::none;
    s.block_waiting = 0;
  }
}

inline void barrier(Wait kind) {
  State& s = S();
  Fiber& f = self();
  const int warp = s.current / 32;
  f.wait = kind;
  if (kind == Wait::warp) {
    if (++s.warp_waiting[warp] == s.warp_live[warp]) release(kind, warp);
  } else {
    if (++s.block_waiting == s.live) release(kind, warp);
  }
  yield_to_scheduler();
}

inline void warp_collective_check() {
  State& s = S();
  if (s.warp_live[s.current / 32] != 32) fail("a warp collective without all 32 lanes alive");
}

inline void run_block() {
  State& s = S();
  const int n = s.nthreads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.sp = initial_sp(f.stack);
    f.wait = Wait::none;
    f.done = false;
    f.groups.clear();
    f.open.clear();
  }
  s.live = n;
  for (int w = 0; w < (n + 31) / 32; ++w) {
    s.warp_live[w] = n - w * 32 < 32 ? n - w * 32 : 32;
    s.warp_waiting[w] = 0;
  }
  s.block_waiting = 0;
  while (s.live > 0) {
    int pick = -1;
    if (options().high_first) {
      for (int i = n - 1; i >= 0 && pick < 0; --i)
        if (!s.fibers[i].done && s.fibers[i].wait == Wait::none) pick = i;
    } else {
      for (int i = 0; i < n && pick < 0; ++i)
        if (!s.fibers[i].done && s.fibers[i].wait == Wait::none) pick = i;
    }
    if (pick < 0) {
      // Every live thread waits: a barrier whose missing members exited, or a deadlock.
      bool released = false;
      for (int w = 0; w < (n + 31) / 32; ++w)
        if (s.warp_live[w] > 0 && s.warp_waiting[w] == s.warp_live[w]) {
          release(Wait::warp, w);
          released = true;
        }
      if (!released && s.block_waiting == s.live) {
        release(Wait::block, 0);
        released = true;
      }
      if (!released) {
        std::fprintf(stderr, "lk_emu: deadlock in block (%u, %u, %u):", s.bidx.x, s.bidx.y,
                     s.bidx.z);
        for (int i = 0; i < n; ++i)
          if (!s.fibers[i].done)
            std::fprintf(stderr, " t%d:%s", i, s.fibers[i].wait == Wait::warp ? "warp" : "block");
        fail("threads wait at different barriers");
      }
      continue;
    }
    s.current = pick;
    switch_to(&s.sched_sp, s.fibers[pick].sp);
    s.current = -1;
  }
}

// Run `body` (the kernel call) for every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  State& s = S();
  s.grid = grid;
  s.block = block;
  s.nthreads = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1) fail("only 1-D blocks are emulated");
  while (static_cast<int>(s.stacks.size()) < s.nthreads)
    s.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  s.fibers.assign(s.nthreads, Fiber{});
  for (int i = 0; i < s.nthreads; ++i) s.fibers[i].stack = s.stacks[i];
  s.slots.assign(s.nthreads + 32, Slot{});
  s.warp_waiting.assign((s.nthreads + 31) / 32, 0);
  s.warp_live.assign((s.nthreads + 31) / 32, 0);
  s.smem_bytes = smem_bytes;
  s.smem_store.assign(smem_bytes + 256, 0);
  s.smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(s.smem_store.data()) + 127) & ~uintptr_t(127));
  s.body = std::move(body);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        s.bidx = dim3(x, y, z);
        std::memset(s.smem, 0xff, smem_bytes);
        run_block();
      }
  s.body = nullptr;
}

inline unsigned char* dynamic_smem() { return S().smem; }
inline uint3 thread_idx() { return uint3{static_cast<unsigned>(S().current), 0u, 0u}; }
inline uint3 block_idx() { return uint3{S().bidx.x, S().bidx.y, S().bidx.z}; }
inline dim3 block_dim() { return S().block; }
inline dim3 grid_dim() { return S().grid; }

inline bool in_smem(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= S().smem && c + bytes <= S().smem + S().smem_bytes;
}

inline Slot& my_slot() { return S().slots[S().current]; }
inline Slot& lane_slot(int lane) { return S().slots[(S().current / 32) * 32 + lane]; }
inline int lane_id() { return S().current % 32; }

template <typename V>
inline V shfl(V v, int src_lane) {
  static_assert(sizeof(V) <= sizeof(uint32_t) * 2, "shuffle of a value wider than 64 bits");
  warp_collective_check();
  std::memcpy(my_slot().u, &v, sizeof(V));
  barrier(Wait::warp);
  V r;
  std::memcpy(&r, lane_slot(src_lane & 31).u, sizeof(V));
  barrier(Wait::warp);
  return r;
}

// ------------------------------------------------------------------ cp.async
inline void do_copy(const Copy& c) {
  if (c.bytes > 0) std::memcpy(c.dst, c.src, c.bytes);
  if (c.size > c.bytes) std::memset(static_cast<char*>(c.dst) + c.bytes, 0, c.size - c.bytes);
}

inline void cp_async(void* dst, const void* src, int bytes, int size) {
  if (!in_smem(dst, size)) fail("cp.async destination outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % size != 0) fail("cp.async destination misaligned");
  if (bytes != 0 && bytes != size) fail("cp.async src-size must be 0 or the copy size here");
  if (bytes > 0 && reinterpret_cast<uintptr_t>(src) % size != 0) fail("cp.async source misaligned");
  Copy c{dst, src, bytes, size};
  if (options().copy_at_issue) do_copy(c);
  else self().open.push_back(c);
}

// ------------------------------------------------------------------ fragments
inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

template <bool BF16>
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  warp_collective_check();
  Slot& me = my_slot();
  for (int i = 0; i < 4; ++i) me.u[i] = a[i];
  me.u[4] = b[0];
  me.u[5] = b[1];
  barrier(Wait::warp);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const Slot& s = lane_slot(l);
    const int g = l / 4, t = l % 4;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h)
        A[rows[i]][cols[i] + h] = half_bits_to_float(static_cast<uint16_t>(s.u[i] >> (16 * h)), BF16);
    for (int i = 0; i < 2; ++i)
      for (int h = 0; h < 2; ++h)
        B[2 * t + 8 * i + h][g] =
            half_bits_to_float(static_cast<uint16_t>(s.u[4 + i] >> (16 * h)), BF16);
  }
  barrier(Wait::warp);
  const int l = lane_id(), g = l / 4, t = l % 4;
  const int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[rr[i]][k]) * B[k][cc[i]];
    d[i] = static_cast<float>(acc);
  }
}

template <bool TRANS>
inline void ldmatrix(uint32_t (&r)[4], const void* row) {
  warp_collective_check();
  if (!in_smem(row, 16)) fail("ldmatrix row outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  my_slot().ptr = row;
  barrier(Wait::warp);
  const int l = lane_id();
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row_in = TRANS ? 2 * (l % 4) + h : l / 4;
      const int col_in = TRANS ? l / 4 : 2 * (l % 4) + h;
      const uint16_t* p = static_cast<const uint16_t*>(lane_slot(8 * i + row_in).ptr);
      e[h] = p[col_in];
    }
    out[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  barrier(Wait::warp);
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}

}  // namespace lk_emu

// ------------------------------------------------------------------ the CUDA names kernels use
#define threadIdx (::lk_emu::thread_idx())
#define blockIdx (::lk_emu::block_idx())
#define blockDim (::lk_emu::block_dim())
#define gridDim (::lk_emu::grid_dim())

inline void __syncthreads() { ::lk_emu::barrier(::lk_emu::Wait::block); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::lk_emu::fail("__syncwarp with a partial mask");
  ::lk_emu::barrier(::lk_emu::Wait::warp);
}

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  if (mask != 0xffffffffu) ::lk_emu::fail("shuffle with a partial mask");
  return ::lk_emu::shfl(v, ::lk_emu::lane_id() ^ lane_mask);
}

template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src_lane) {
  if (mask != 0xffffffffu) ::lk_emu::fail("shuffle with a partial mask");
  return ::lk_emu::shfl(v, src_lane);
}

namespace lora_kernels {

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::lk_emu::mma<std::is_same<T, __nv_bfloat16>::value>(d, a, b);
}

// Shared-memory addresses are offsets from the start of the block's dynamic shared memory.
inline uint32_t smem_addr(const void* p) {
  if (!::lk_emu::in_smem(p, 0)) ::lk_emu::fail("smem_addr of a pointer outside shared memory");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::lk_emu::S().smem);
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t row) {
  ::lk_emu::ldmatrix<false>(r, ::lk_emu::S().smem + row);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row) {
  ::lk_emu::ldmatrix<true>(r, ::lk_emu::S().smem + row);
}
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  ::lk_emu::cp_async(dst, src, src_bytes, 16);
}
inline void cp_async_4(void* dst, const void* src, int src_bytes) {
  ::lk_emu::cp_async(dst, src, src_bytes, 4);
}
inline void cp_async_commit() {
  auto& f = ::lk_emu::self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& f = ::lk_emu::self();
  while (static_cast<int>(f.groups.size()) > N) {
    for (const auto& c : f.groups.front()) ::lk_emu::do_copy(c);
    f.groups.erase(f.groups.begin());
  }
}

}  // namespace lora_kernels
