// run_pass instances of the normalize pass (Normalize in uan_passes.cuh).
#include "uan_passes.cuh"

UAN_INSTANTIATE_PASS(Normalize)
