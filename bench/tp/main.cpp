// parabench-tp: the reference model trained with tensor (and sequence) parallelism, combined with
// data parallelism (see README.md). The app is one definition (tensor_parallel_app.cpp) that
// parabench-plan --app tp plans from too.
#include "bench/tp/tensor_parallel.h"

int main(int argc, char** argv) { return pb::run_app(argc, argv, pb::make_tp_app()); }
