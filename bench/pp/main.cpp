// parabench-pp: the reference model trained with pipeline parallelism (naive, GPipe, 1F1B and
// interleaved schedules), combined with data parallelism (see README.md). The app is one definition
// (pipeline_app.cpp) that parabench-plan --app pp plans from too.
#include "bench/pp/pipeline_parallel.h"

int main(int argc, char** argv) { return pb::run_app(argc, argv, pb::make_pipeline_app()); }
