// run_pass instances of the backward's elementwise pass (BackwardElementwise in uan_passes.cuh).
#include "uan_passes.cuh"

UAN_INSTANTIATE_PASS(BackwardElementwise)
