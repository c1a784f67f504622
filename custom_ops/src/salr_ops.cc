// Entry point ORT calls when a session registers libsalr_ops.so (SessionOptions.register_custom_ops_library).
//
// The library is built against the ORT 1.21 headers and receives the API table at run time; it links
// against no libonnxruntime. RegisterCustomOps is the only exported symbol (salr_ops.map) and no C++
// exception leaves it.
#include <mutex>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"
#include "cpu/cpu_ops.h"
#ifdef SALR_WITH_CUDA  // [GPU kernels, issue 7] CUDA EP kernels, built with -DSALR_CUDA=ON
#include "cuda/cuda_ops.h"
#endif
#include "salr_ops.h"

namespace {

// Domains must outlive every session that uses them; ORT keeps pointers into them.
void keep_domain(Ort::CustomOpDomain&& domain) {
  static std::vector<Ort::CustomOpDomain> domains;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  domains.push_back(std::move(domain));
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // cannot report anything without an API table; ORT never does this
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Every ORT release answers GetApi(1), and CreateStatus is its first entry.
    const OrtApi* oldest = api_base->GetApi(1);
    if (oldest == nullptr) return nullptr;
    const char* version = api_base->GetVersionString ? api_base->GetVersionString() : "unknown";
    const std::string msg = std::string("libsalr_ops was built for ONNX Runtime API version ") +
                            std::to_string(ORT_API_VERSION) + " (ORT 1." + std::to_string(ORT_API_VERSION) +
                            ") or newer; this runtime is ORT " + version + ". Upgrade onnxruntime.";
    return oldest->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain{salr::kDomain};
    salr::Cpu::RegisterOps(domain);
#ifdef SALR_WITH_CUDA  // [GPU kernels, issue 7] same domain: ORT binds each node to its provider's kernel
    salr::Cuda::RegisterOps(domain);
#endif
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    keep_domain(std::move(domain));
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), (std::string("libsalr_ops: ") + e.what()).c_str());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("libsalr_ops: ") + e.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "libsalr_ops: unknown C++ exception during registration");
  }
}
