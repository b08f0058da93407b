#include "bindings/cpu_bindings.h"

namespace nf4lora {
void register_cpu_linear(pybind11::module_& m) {}
}  // namespace nf4lora
