// Registration of the lora_kernels CUDA extension with PyTorch's dispatcher: the schemas of the
// `lora_kernels_cuda` library and their CUDA implementations. The implementations are also
// registered for CPU only so that CPU tensors reach the argument checks and get a message that
// names the argument ("... must be a CUDA tensor") instead of a dispatcher error.
// Python imports the shared object as `lora_kernels._C` (an empty module); the ops live in
// torch.ops.lora_kernels_cuda.

#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cuda_runtime_api.h>

#include <tuple>

namespace lora_kernels {

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, int64_t seed);
at::Tensor lora_expand(const at::Tensor& s, const at::Tensor& lora_B,
                       const c10::optional<at::Tensor>& bias, double scaling,
                       at::ScalarType out_dtype);
std::tuple<at::Tensor, at::Tensor> lora_grad_s_b(const at::Tensor& dy, const at::Tensor& s,
                                                 const at::Tensor& lora_B, double scaling,
                                                 bool need_dB);
std::tuple<at::Tensor, at::Tensor> lora_grad_x_a(const at::Tensor& ds, const at::Tensor& x,
                                                 const at::Tensor& lora_A, double dropout_p,
                                                 int64_t seed, bool need_dx, bool need_dA);

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale);

}  // namespace lora_kernels

TORCH_LIBRARY(lora_kernels_cuda, m) {
  m.def("lora_shrink(Tensor x, Tensor lora_A, float dropout_p, int seed) -> Tensor");
  m.def(
      "lora_expand(Tensor s, Tensor lora_B, Tensor? bias, float scaling, ScalarType out_dtype) "
      "-> Tensor");
  m.def(
      "lora_grad_s_b(Tensor dy, Tensor s, Tensor lora_B, float scaling, bool need_dB) "
      "-> (Tensor, Tensor)");
  m.def(
      "lora_grad_x_a(Tensor ds, Tensor x, Tensor lora_A, float dropout_p, int seed, bool need_dx, "
      "bool need_dA) -> (Tensor, Tensor)");
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
      "Tensor prefix_v, Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#define LK_REGISTER_IMPLS(m)                                          \
  m.impl("lora_shrink", &lora_kernels::lora_shrink);                  \
  m.impl("lora_expand", &lora_kernels::lora_expand);                  \
  m.impl("lora_grad_s_b", &lora_kernels::lora_grad_s_b);              \
  m.impl("lora_grad_x_a", &lora_kernels::lora_grad_x_a);              \
  m.impl("prefix_attention_fwd", &lora_kernels::prefix_attention_fwd); \
  m.impl("prefix_attention_bwd", &lora_kernels::prefix_attention_bwd)

TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) { LK_REGISTER_IMPLS(m); }

// CPU: the same functions, which raise "<op>: <argument> must be a CUDA tensor" (or a shape
// message) before touching any data.
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CPU, m) { LK_REGISTER_IMPLS(m); }

// The module Python imports; the registrations above run when the shared object is loaded.
static struct PyModuleDef lora_kernels_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "lora_kernels CUDA extension: ops registered in torch.ops.lora_kernels_cuda", -1, nullptr};

#define LK_STR2(x) #x
#define LK_STR(x) LK_STR2(x)

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&lora_kernels_c_module);
  if (module == nullptr) return nullptr;
  // The torch and CUDA versions this object was compiled against: the loader compares them with
  // the running torch.
  const char* torch_version = LK_STR(TORCH_VERSION_MAJOR) "." LK_STR(TORCH_VERSION_MINOR) "." LK_STR(
      TORCH_VERSION_PATCH);
  if (PyModule_AddStringConstant(module, "torch_version", torch_version) < 0 ||
      PyModule_AddIntConstant(module, "cuda_runtime_version", CUDART_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
