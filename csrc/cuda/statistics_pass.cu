// run_pass instances of the statistics pass (Statistics in uan_passes.cuh).
#include "uan_passes.cuh"

#define UAN_PASS Statistics
namespace uan::cuda {
UAN_FOR_EACH_INPUT_TYPE(UAN_RUN_PASS_INSTANCE)
}  // namespace uan::cuda
