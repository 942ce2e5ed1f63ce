// run_pass instances of the statistics pass (Statistics in uan_passes.cuh).
#include "uan_passes.cuh"

UAN_INSTANTIATE_PASS(Statistics)
