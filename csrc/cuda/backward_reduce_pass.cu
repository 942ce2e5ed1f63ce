// run_pass instances of the backward's reduce pass (BackwardReduce in uan_passes.cuh).
#include "uan_passes.cuh"

#define UAN_PASS BackwardReduce
namespace uan::cuda {
UAN_FOR_EACH_INPUT_TYPE(UAN_RUN_PASS_INSTANCE)
}  // namespace uan::cuda
