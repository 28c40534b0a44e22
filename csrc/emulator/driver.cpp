// C entry points that run the extension's kernels in the CPU emulator (emulator.h), for
// tests/test_cuda_emulated.py (loaded with ctypes). They mirror the ATen entry points
// (prefix_attention_*.cu, lora_linear.cu) on contiguous host arrays, with the same launchers.
//
//   g++ -std=c++17 -O2 -fno-strict-aliasing -shared -fPIC -DLK_CPU_EMULATION \
//       -I csrc -I <cuda>/include csrc/emulator/driver.cpp -o lk_emu.so
#include "../lora_linear/lora_ops.cuh"
#include "../prefix_attention/attention_bwd.cuh"
#include "../prefix_attention/attention_fwd.cuh"

#include <memory>
#include <vector>

using namespace lora_kernels;

// Contiguous (B, H, L, D) arrays; kpm (B, Lk) bytes or null; dtype 0 = fp16, 1 = bf16.
struct EmuAttnArgs {
  int dtype, D, B, Hq, Hkv, Lq, Lk, P, Bp, causal, sms;
  float scale;
  const void *q, *k, *v, *pk, *pv;
  const uint8_t* kpm;
  void* out;
  float* lse;
  const void* dout;
  void *dq, *dk, *dv, *dpk, *dpv;
};

static attn::Params attn_params(const EmuAttnArgs& a) {
  attn::Params p{};
  const int64_t D = a.D;
  p.B = a.B; p.Hq = a.Hq; p.Hkv = a.Hkv; p.Lq = a.Lq; p.Lk = a.Lk; p.P = a.P; p.Bp = a.Bp;
  p.causal = a.causal != 0;
  p.scale = a.scale;
  p.scale_log2 = a.scale * attn::LOG2E;
  p.q = a.q; p.q_sl = D; p.q_sh = a.Lq * D; p.q_sb = a.Hq * p.q_sh;
  p.k = a.k; p.k_sl = D; p.k_sh = a.Lk * D; p.k_sb = a.Hkv * p.k_sh;
  p.v = a.v; p.v_sl = D; p.v_sh = a.Lk * D; p.v_sb = a.Hkv * p.v_sh;
  p.pk = a.pk; p.pk_sl = D; p.pk_sh = a.P * D; p.pk_sb = a.Bp == 1 ? 0 : a.Hkv * p.pk_sh;
  p.pv = a.pv; p.pv_sl = D; p.pv_sh = a.P * D; p.pv_sb = a.Bp == 1 ? 0 : a.Hkv * p.pv_sh;
  p.kpm = a.kpm; p.kpm_sb = a.Lk; p.kpm_sl = 1;
  p.out = a.out; p.o_sl = D; p.o_sh = a.Lq * D; p.o_sb = a.Hq * p.o_sh;
  p.lse = a.lse;
  p.dout = a.dout; p.do_sl = D; p.do_sh = a.Lq * D; p.do_sb = a.Hq * p.do_sh;
  p.dq = a.dq; p.dk = a.dk; p.dv = a.dv; p.dpk = a.dpk; p.dpv = a.dpv;
  return p;
}

template <typename F>
static int dispatch_attn(const EmuAttnArgs& a, F&& f) {
  if (a.D != 64 && a.D != 128) return 1;
  if (a.dtype == 0) {
    if (a.D == 64) f(__half(), std::integral_constant<int, 64>());
    else f(__half(), std::integral_constant<int, 128>());
  } else {
    if (a.D == 64) f(__nv_bfloat16(), std::integral_constant<int, 64>());
    else f(__nv_bfloat16(), std::integral_constant<int, 128>());
  }
  return 0;
}

// Temporary buffers for lora_ops.cuh.
struct Scratch {
  std::vector<std::unique_ptr<float[]>> f;
  std::vector<std::unique_ptr<uint32_t[]>> w;
  float* floats(int64_t n) {
    f.emplace_back(new float[n]);
    return f.back().get();
  }
  uint32_t* words(int64_t n) {
    w.emplace_back(new uint32_t[n]);
    return w.back().get();
  }
};

// dtype codes of the LoRA entry points: 0 = fp32, 1 = fp16, 2 = bf16.
template <typename F>
static int dispatch_float(int dtype, F&& f) {
  if (dtype == 0) f(float());
  else if (dtype == 1) f(__half());
  else if (dtype == 2) f(__nv_bfloat16());
  else return 1;
  return 0;
}

extern "C" {

// Scheduling options of the emulator (see emulator.h).
void lk_emu_set_options(int copy_at_issue, int high_first) {
  lk_emu::options().copy_at_issue = copy_at_issue != 0;
  lk_emu::options().high_first = high_first != 0;
}

int lk_emu_attn_fwd(const EmuAttnArgs* a) {
  const attn::Params p = attn_params(*a);
  return dispatch_attn(*a, [&](auto t, auto d) {
    attn::launch_fwd<decltype(t), decltype(d)::value>(p, nullptr);
  });
}

int lk_emu_attn_bwd(const EmuAttnArgs* a) {
  attn::Params p = attn_params(*a);
  std::vector<float> delta(static_cast<size_t>(a->B) * a->Hq * a->Lq);
  p.delta = delta.data();
  const int chunks = attn::prefix_batch_chunks(p, a->sms);
  const size_t part = static_cast<size_t>(a->Hkv) * a->P * a->D;
  std::vector<float> ws_k(chunks > 1 ? chunks * part : 0), ws_v(chunks > 1 ? chunks * part : 0);
  return dispatch_attn(*a, [&](auto t, auto d) {
    using T = decltype(t);
    attn::launch_bwd<T, decltype(d)::value>(p, nullptr, chunks, ws_k.data(), ws_v.data());
    if (chunks > 1) {  // as at::sum(ws, 0): chunk by chunk, in order
      for (size_t e = 0; e < part; ++e) {
        float sk = 0.f, sv = 0.f;
        for (int c = 0; c < chunks; ++c) {
          sk += ws_k[c * part + e];
          sv += ws_v[c * part + e];
        }
        static_cast<T*>(a->dpk)[e] = from_float<T>(sk);
        static_cast<T*>(a->dpv)[e] = from_float<T>(sv);
      }
    }
  });
}

// The four LoRA ops of lora_linear.cu on contiguous host arrays (adapters fp32 with their
// original dtype's term count; x, dy row stride *_sm); a null dx / da / db is not computed.
int lk_emu_lora_shrink(int x_dtype, const void* x, int64_t x_sm, const float* A, int a_terms,
                       float* s, int64_t T, int64_t in, int r, double p, int64_t seed, int sms) {
  Scratch scratch;
  return dispatch_float(x_dtype, [&](auto t) {
    using TX = decltype(t);
    lora::shrink<TX>(static_cast<const TX*>(x), x_sm, x_sm % 4 == 0, A, a_terms, s, T, in, r, p,
                     seed, sms, scratch, nullptr);
  });
}

int lk_emu_lora_expand(int y_dtype, const float* s, const float* B, int b_terms, const void* bias,
                       void* y, int64_t T, int64_t out, int r, float scaling) {
  return dispatch_float(y_dtype, [&](auto t) {
    using TY = decltype(t);
    lora::expand<TY>(s, B, b_terms, static_cast<const TY*>(bias), static_cast<TY*>(y), T, out, r,
                     scaling, nullptr);
  });
}

int lk_emu_lora_grad_s_b(int dy_dtype, const void* dy, int64_t dy_sm, const float* s,
                         const float* B, int b_terms, float* ds, float* db, int64_t T,
                         int64_t out, int r, float scaling, int sms) {
  Scratch scratch;
  return dispatch_float(dy_dtype, [&](auto t) {
    using TY = decltype(t);
    lora::grad_s_b<TY>(static_cast<const TY*>(dy), dy_sm, dy_sm % 4 == 0, s, B, b_terms, ds, db,
                       T, out, r, scaling, sms, scratch, nullptr);
  });
}

int lk_emu_lora_grad_x_a(int x_dtype, const float* ds, const void* x, int64_t x_sm,
                         const float* A, int a_terms, void* dx, float* da, int64_t T, int64_t in,
                         int r, double p, int64_t seed, int sms) {
  Scratch scratch;
  return dispatch_float(x_dtype, [&](auto t) {
    using TX = decltype(t);
    lora::grad_x_a<TX>(ds, static_cast<const TX*>(x), x_sm, x_sm % 4 == 0, A, a_terms,
                       static_cast<TX*>(dx), da, T, in, r, p, seed, sms, scratch, nullptr);
  });
}

// Keep bits of elements (row, 4 c4 .. +3) (the Philox mask of device/philox.cuh).
uint32_t lk_emu_keep_nibble(uint64_t seed, int64_t row, int64_t c4, uint32_t threshold) {
  return keep_nibble(seed, row, c4, threshold);
}

uint32_t lk_emu_dropout_threshold(double p) { return dropout_threshold(p); }

}  // extern "C"
