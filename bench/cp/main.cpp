// parabench-cp: the reference model trained with context parallelism (each sequence split over the cp
// ranks), combined with data parallelism (see README.md). The app is one definition
// (context_parallel_app.cpp) that parabench-plan --app cp plans from too.
#include "bench/cp/context_parallel.h"

int main(int argc, char** argv) { return pb::run_app(argc, argv, pb::make_cp_app()); }
