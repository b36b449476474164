// parabench-fsdp: the reference model trained with sharded data parallelism (see README.md). The app is
// one definition (fully_sharded_app.cpp) that parabench-plan --app fsdp plans from too.
#include "bench/fsdp/fully_sharded.h"

int main(int argc, char** argv) { return pb::run_app(argc, argv, pb::make_fsdp_app()); }
