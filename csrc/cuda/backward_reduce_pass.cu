// run_pass instances of the backward's reduce pass (BackwardReduce in uan_passes.cuh).
#include "uan_passes.cuh"

UAN_INSTANTIATE_PASS(BackwardReduce)
