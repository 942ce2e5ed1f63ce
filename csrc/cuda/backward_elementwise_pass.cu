// run_pass instances of the backward's elementwise pass (BackwardElementwise in uan_passes.cuh).
#include "uan_passes.cuh"

#define UAN_PASS BackwardElementwise
namespace uan::cuda {
UAN_FOR_EACH_INPUT_TYPE(UAN_RUN_PASS_INSTANCE)
}  // namespace uan::cuda
