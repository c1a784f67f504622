// CPU execution-provider registrations of the com.salr ops.
#pragma once

#include "onnxruntime_cxx_api.h"

namespace salr {
namespace Cpu {

// Adds every CPU kernel (all supported type combinations of BitmapDecode, FusedAdapterGemm, SALRLinear).
void RegisterOps(Ort::CustomOpDomain& domain);

}  // namespace Cpu
}  // namespace salr
