// parabench-dp: the reference model trained with data parallelism (see README.md). The app is one
// definition (data_parallel_app.cpp) that parabench-plan --app dp plans from too.
#include "bench/dp/data_parallel.h"

int main(int argc, char** argv) { return pb::run_app(argc, argv, pb::make_dp_app()); }
