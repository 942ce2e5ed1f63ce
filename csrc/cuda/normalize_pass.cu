// run_pass instances of the normalize pass (Normalize in uan_passes.cuh).
#include "uan_passes.cuh"

#define UAN_PASS Normalize
namespace uan::cuda {
UAN_FOR_EACH_INPUT_TYPE(UAN_RUN_PASS_INSTANCE)
}  // namespace uan::cuda
