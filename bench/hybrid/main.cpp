// parabench-hybrid: the reference model trained with data (or sharded data), tensor, pipeline, context and
// expert parallelism at once (see README.md). The app is one definition (hybrid_app.cpp) that
// parabench-plan --app hybrid plans from too.
#include "bench/hybrid/hybrid.h"

int main(int argc, char** argv) { return pb::run_app(argc, argv, pb::make_hybrid_app()); }
