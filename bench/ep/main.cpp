// parabench-ep: the mixture-of-experts model trained with expert parallelism, combined with data
// parallelism (see README.md). The app is one definition (expert_parallel_app.cpp) that parabench-plan
// --app ep plans from too.
#include "bench/ep/expert_parallel.h"

int main(int argc, char** argv) { return pb::run_app(argc, argv, pb::make_ep_app()); }
