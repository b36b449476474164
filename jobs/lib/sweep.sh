# Sourced by jobs/submit and jobs/run-local: the sweeps of SPEC.md section 7 as lists of points.
# A point is one run: an app, an allocation (nodes x ranks per node), a label and the app arguments
# the sweep sets; the user's app arguments (after --) are added to every point. The caller defines
# die(), then calls sweep_parse, load_profile (sources jobs/clusters/<name>.env) and sweep_points.
#
#   micro-batch     --micro-batch over --values (default 1,2,4,8), one job size; app fsdp unless --app
#   shard           parabench-fsdp --shard over --values (default all five strategies), one job size
#   strategy        the apps of --values (default dp,fsdp,tp,pp,ep,cp) at one model, job size and
#                   global batch: fsdp FULL_SHARD, tp and pp of degree --tp/--pp (default ranks per
#                   node), ep with --experts/--top-k (default 8, 2) and degree --ep (default the largest
#                   that divides both the ranks per node and the experts), cp of degree --cp (default
#                   the largest that divides the ranks per node and splits the sequence evenly)
#   sequence        parabench-cp at the sequence lengths of --values (default 1024,2048,4096,8192)
#                   with the cp degree growing with them (--cp, default 1, 2, 4, ... up to the largest
#                   job of the profile), dp 1: each point runs on its cp ranks, one job size per point
#   weak-scaling    rank counts (--ranks, --nodes) at a fixed micro-batch per rank: the global
#                   batch grows with the data-parallel degree
#   strong-scaling  the same rank counts at one global batch: micro-batch x the least common
#                   multiple of the rank counts (the largest, for powers of two)
#   layout          parabench-hybrid at the planner's --top N (--values N, default 4) layouts for the model
#                   on the profile's job (PB_NODES x PB_TASKS_PER_NODE ranks): parabench-plan --app hybrid
#                   --search with the model, --global-batch and precision of the app arguments and
#                   --gpu-memory (the sweep's, else PB_GPU_MEMORY_GIB); each point's tag records the
#                   planner's rank and step time (planned_rank=R planned_step_s=S) for the report
#   micro           parabench-micro on 1 node, 2 nodes and all PB_MAX_NODES nodes (--nodes N: up to
#                   N; --nodes LIST: those), whole nodes of PB_TASKS_PER_NODE ranks, one job size
#                   per point: the GEMMs and kernels on each rank, the collectives across the job
# shellcheck shell=bash disable=SC2034  # the sweep_* and point_* variables are the caller's

sweep_names=(micro-batch shard strategy sequence weak-scaling strong-scaling micro layout)
sweep_apps=(dp fsdp tp pp ep cp hybrid)
shard_strategies=(NO_SHARD ZERO1 SHARD_GRAD_OP FULL_SHARD HYBRID_SHARD)

# The options that both jobs/submit and jobs/run-local --sweep take, for their --help.
sweep_options_help() {
  cat <<EOF
  SWEEP              one of: ${sweep_names[*]}
  --cluster PROFILE  jobs/clusters/PROFILE.env: allocation, launcher, modules; a name
                     ([A-Za-z0-9._-], not starting with '.'), not a path
  --app APP          micro-batch and scaling sweeps: the app (default fsdp, resp. dp)
  --values LIST      comma-separated values of the sweep: micro-batch: micro-batches (1,2,4,8);
                     shard: strategies ($(IFS=,; echo "${shard_strategies[*]}"));
                     strategy: apps (dp,fsdp,tp,pp,ep,cp);
                     sequence: growing sequence lengths (1024,2048,4096,8192);
                     layout: how many of the planner's fastest layouts (4)
  --ranks LIST       scaling sweeps: rank counts, each at most one node's ranks or whole nodes
                     (default 1, 2, 4, ... up to PB_MAX_NODES nodes of PB_TASKS_PER_NODE ranks)
  --nodes LIST       scaling sweeps: node counts instead, whole nodes each; micro sweep: one
                     count N (1, 2 and N nodes) or a list of node counts (default 1, 2, PB_MAX_NODES)
  --tp N, --pp N     strategy sweep: tensor and pipeline degree (default PB_TASKS_PER_NODE)
  --ep N             strategy sweep: expert-parallel degree (default the largest that divides
                     both PB_TASKS_PER_NODE and the experts)
  --experts E, --top-k K
                     strategy sweep: ep's experts per layer and experts per token (default 8, 2)
  --cp N             strategy sweep: context-parallel degree (default the largest that divides
                     PB_TASKS_PER_NODE and splits --seq into 2N chunks, N with --cp-layout contiguous)
  --cp LIST          sequence sweep: the cp degree of each sequence length (default 1, 2, 4, ...
                     up to PB_MAX_NODES x PB_TASKS_PER_NODE); each point runs on its cp ranks
  --gpu-memory GIB   layout sweep: the memory a layout must fit, per rank (default PB_GPU_MEMORY_GIB)
  --tag TEXT         added to the tag each point stores (sweep=SWEEP point=LABEL)
  --out DIR          the sweep's directory (default results/sweeps/SWEEP_CLUSTER_<UTC time>)
  --dry-run          print what would run, run nothing
  --points           print the points (points.tsv: index, label, app, nodes, ranks per node,
                     shell-quoted app arguments) on stdout, run nothing (jobs/reframe reads them)
EOF
}

# shellcheck source-path=SCRIPTDIR source=options.sh
source "$(dirname "${BASH_SOURCE[0]}")/options.sh"

# Prints the value of option $1 in the app arguments (after $1); nothing when it is not there.
option_value() {
  local opt=$1
  shift
  while [[ $# -gt 0 ]]; do
    case $1 in
      "$opt") [[ $# -ge 2 ]] && echo "$2"; return 0 ;;
      "$opt="*) echo "${1#*=}"; return 0 ;;
    esac
    shift
  done
}

# Splits a comma-separated list into the array named $2; dies on an empty item or a duplicate.
split_list() {
  local -n list_out=$2
  local item seen=" "
  IFS=, read -r -a list_out <<<"$1"
  [[ ${#list_out[@]} -gt 0 ]] || die "empty list '$1'"
  for item in "${list_out[@]}"; do
    [[ -n $item ]] || die "empty item in the list '$1'"
    [[ $seen != *" $item "* ]] || die "'$item' appears twice in '$1'"
    seen+="$item "
  done
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

gcd() {
  local a=$1 b=$2 t
  while ((b > 0)); do t=$((a % b)) a=$b b=$t; done
  echo "$a"
}

# The sequence length and heads of the model the app arguments describe, into model_seq and
# model_heads: --seq and --heads where given, else the --model preset's (SPEC.md section 4; default
# small); 0 where unknown (a preset this script does not know, a value that is not a number: the app
# judges those).
model_shape() {
  local model seq heads
  model=$(option_value --model "${app_args[@]}")
  case ${model:-small} in
    tiny) model_seq=32 model_heads=4 ;;
    small) model_seq=128 model_heads=8 ;;
    gpt2-124m) model_seq=1024 model_heads=12 ;;
    gpt2-350m) model_seq=1024 model_heads=16 ;;
    gpt2-1.5b) model_seq=1024 model_heads=25 ;;
    block-4k) model_seq=2048 model_heads=32 ;;
    *) model_seq=0 model_heads=0 ;;
  esac
  seq=$(option_value --seq "${app_args[@]}")
  heads=$(option_value --heads "${app_args[@]}")
  [[ -z $seq ]] || { is_count "$seq" && model_seq=$seq || model_seq=0; }
  [[ -z $heads ]] || { is_count "$heads" && model_heads=$heads || model_heads=0; }
}

# True when parabench-cp takes degree $1 for sequence length $2 (0: unknown, taken) and model_heads:
# --cp-layout zigzag (the default) splits each sequence into 2 x cp chunks, contiguous into cp;
# --cp-algo alltoall gives each rank heads/cp heads. Sets cp_rule to the rule a refused degree breaks.
cp_takes() {
  local cp=$1 seq=$2 layout algo chunks
  layout=$(option_value --cp-layout "${app_args[@]}")
  algo=$(option_value --cp-algo "${app_args[@]}")
  local split="2 x cp"
  chunks=$((2 * cp))
  if [[ $layout == contiguous ]]; then
    chunks=$cp split=cp
  fi
  if ((seq > 0 && seq % chunks != 0)); then
    cp_rule="sequence length $seq is not divisible by $chunks (--cp-layout ${layout:-zigzag} splits each sequence into $split chunks)"
    return 1
  fi
  if [[ $algo == alltoall ]] && ((model_heads > 0 && model_heads % cp != 0)); then
    cp_rule="--heads $model_heads is not divisible by cp $cp (--cp-algo alltoall gives each rank heads/cp heads)"
    return 1
  fi
  return 0
}

# Parses the sweep command line into sweep, profile_name, sweep_* and app_args (after --).
# $1 is the caller's usage function.
sweep_parse() {
  local usage_fn=$1 opt value
  shift
  sweep='' profile_name=${PB_CLUSTER:-} profile_from=PB_CLUSTER sweep_app='' sweep_values='' sweep_ranks='' sweep_nodes=''
  sweep_tp='' sweep_pp='' sweep_ep='' sweep_cp='' sweep_experts='' sweep_top_k='' sweep_tag='' sweep_out='' dry_run=0 list_points=0
  sweep_gpu_memory=''  # the layout sweep's --gpu-memory
  app_args=()
  while [[ $# -gt 0 ]]; do
    opt=$1
    case $opt in
      -h|--help) "$usage_fn"; exit 0 ;;
      --dry-run) dry_run=1; shift; continue ;;
      --points) list_points=1; shift; continue ;;
      --) shift; app_args=("$@"); break ;;
      --*=*) value=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*)
        [[ $# -ge 2 ]] || die "$opt needs a value (see --help)"
        value=$2; shift 2 ;;
      -*) check_text option "$opt"; die "unknown option $opt (app arguments go after --; see --help)" ;;
      *)
        check_text SWEEP "$opt"
        [[ -z $sweep ]] || die "unexpected argument $opt (app arguments go after --; see --help)"
        sweep=$opt; shift; continue ;;
    esac
    check_text "$opt" "$value"  # every value may end up in a script or a path
    case $opt in
      --cluster) profile_name=$value profile_from=--cluster ;;
      --app) sweep_app=$value ;;
      --values) sweep_values=$value ;;
      --ranks) sweep_ranks=$value ;;
      --nodes) sweep_nodes=$value ;;
      --tp) sweep_tp=$value ;;
      --pp) sweep_pp=$value ;;
      --ep) sweep_ep=$value ;;
      --cp) sweep_cp=$value ;;
      --experts) sweep_experts=$value ;;
      --top-k) sweep_top_k=$value ;;
      --tag) sweep_tag=$value ;;
      --gpu-memory) sweep_gpu_memory=$value ;;
      --out) sweep_out=$value ;;
      *) check_text option "$opt"; die "unknown option $opt (app arguments go after --; see --help)" ;;
    esac
  done
  [[ -n $sweep ]] || { "$usage_fn" >&2; exit 2; }
  [[ " ${sweep_names[*]} " == *" $sweep "* ]] || die "unknown sweep '$sweep'; known sweeps: ${sweep_names[*]}"
  if [[ -n $sweep_app ]]; then
    [[ " ${sweep_apps[*]} " == *" $sweep_app "* ]] || die "unknown app '$sweep_app'; known apps: ${sweep_apps[*]}"
  fi
  local own
  for own in --out --tag; do
    has_option "$own" "${app_args[@]}" && die "$own is set by the sweep; give it before -- (see --help)"
  done
  return 0
}

# Loads jobs/clusters/$profile_name.env (from the repository $1) and checks what the sweeps read.
# The profile is found by name (--cluster NAME or PB_CLUSTER, given as $profile_from), never by path.
load_profile() {
  local repo=$1 known
  [[ -n $profile_name ]] || die "name the cluster profile: --cluster NAME (profiles: $(profile_names "$repo"))"
  check_profile_name "${profile_from:---cluster}" "$profile_name"
  [[ -f $repo/jobs/clusters/$profile_name.env ]] || {
    known=$(profile_names "$repo")
    die "unknown cluster '$profile_name': no jobs/clusters/$profile_name.env (profiles: $known)"
  }
  # shellcheck source-path=SCRIPTDIR source=../clusters/local.env
  source "$repo/jobs/clusters/$profile_name.env"
  : "${PB_CLUSTER_NAME:=$profile_name}" "${PB_NODES:=1}" "${PB_MAX_NODES:=$PB_NODES}" "${PB_TASKS_PER_NODE:=1}"
  : "${PB_GPUS_PER_NODE:=0}" "${PB_TIME:=00:30:00}"
  local var
  for var in PB_NODES PB_MAX_NODES PB_TASKS_PER_NODE; do
    is_count "${!var}" || die "$var=${!var} in jobs/clusters/$profile_name.env is not a positive number"
  done
  [[ $PB_GPUS_PER_NODE =~ ^[0-9]+$ ]] || die "PB_GPUS_PER_NODE=$PB_GPUS_PER_NODE in jobs/clusters/$profile_name.env is not a number"
  # What ends up in paths and rendered scripts (PB_SBATCH_ARGS: jobs/submit checks each word).
  for var in PB_CLUSTER_NAME PB_PARTITION PB_ACCOUNT PB_BUILD_DIR; do
    check_text "$var in jobs/clusters/$profile_name.env" "${!var:-}"
  done
}

profile_names() {
  local f names=()
  for f in "$1"/jobs/clusters/*.env; do
    names+=("$(basename "$f" .env)")
  done
  echo "${names[*]}"
}

# The points, in order: point_label, point_app, point_nodes, point_tasks (ranks per node) and
# point_args (the app arguments, shell-quoted; eval "args=($point_args)" gives them back).
add_point() {
  local label=$1 app=$2 nodes=$3 tasks=$4 quoted
  shift 4
  local args=("$@" --tag "sweep=$sweep point=$label${sweep_tag:+ $sweep_tag}" "${app_args[@]}")
  printf -v quoted '%q ' "${args[@]}"
  point_label+=("$label") point_app+=("$app") point_nodes+=("$nodes") point_tasks+=("$tasks")
  point_args+=("${quoted% }")
}

# Nodes and ranks per node of a job of $1 ranks, into alloc_nodes and alloc_tasks.
allocation() {
  local ranks=$1
  if ((ranks <= PB_TASKS_PER_NODE)); then
    alloc_nodes=1 alloc_tasks=$ranks
  elif ((ranks % PB_TASKS_PER_NODE == 0)); then
    alloc_nodes=$((ranks / PB_TASKS_PER_NODE)) alloc_tasks=$PB_TASKS_PER_NODE
    ((alloc_nodes <= PB_MAX_NODES)) ||
      die "$ranks ranks take $alloc_nodes nodes; profile $profile_name allows PB_MAX_NODES=$PB_MAX_NODES"
  else
    die "$ranks ranks is neither at most one node ($PB_TASKS_PER_NODE ranks) nor whole nodes of $profile_name"
  fi
}

# The rank counts of a scaling sweep, into the array scaling_ranks.
scaling_points() {
  local list=() item n
  scaling_ranks=()
  if [[ -n $sweep_ranks && -n $sweep_nodes ]]; then
    die "give --ranks or --nodes, not both"
  elif [[ -n $sweep_ranks ]]; then
    split_list "$sweep_ranks" list
    for item in "${list[@]}"; do
      is_count "$item" || die "--ranks: '$item' is not a positive number"
      scaling_ranks+=("$item")
    done
  elif [[ -n $sweep_nodes ]]; then
    split_list "$sweep_nodes" list
    for item in "${list[@]}"; do
      is_count "$item" || die "--nodes: '$item' is not a positive number"
      scaling_ranks+=($((item * PB_TASKS_PER_NODE)))
    done
  else  # one GPU, two, four, ... a whole node, then 2, 4, ... nodes
    for ((n = 1; n < PB_TASKS_PER_NODE; n *= 2)); do scaling_ranks+=("$n"); done
    for ((n = 1; n <= PB_MAX_NODES; n *= 2)); do scaling_ranks+=($((n * PB_TASKS_PER_NODE))); done
  fi
  [[ ${#scaling_ranks[@]} -ge 2 ]] || die "a scaling sweep needs two rank counts or more, got '${scaling_ranks[*]}' (profile $profile_name: PB_TASKS_PER_NODE=$PB_TASKS_PER_NODE, PB_MAX_NODES=$PB_MAX_NODES); give --ranks or --nodes"
}

# Fills the point arrays for $sweep from the profile and the options.
sweep_points() {
  point_label=() point_app=() point_nodes=() point_tasks=() point_args=()
  local values=() value nodes=$PB_NODES tasks=$PB_TASKS_PER_NODE
  local ranks=$((PB_NODES * PB_TASKS_PER_NODE)) micro_batch
  micro_batch=$(option_value --micro-batch "${app_args[@]}")
  micro_batch=${micro_batch:-1}
  is_count "$micro_batch" || die "--micro-batch $micro_batch is not a positive number"
  if [[ $sweep == sequence && ( -n $sweep_ranks || -n $sweep_nodes ) ]]; then
    die "--ranks and --nodes apply to the scaling sweeps; each point of the sequence sweep runs on its cp ranks (--cp)"
  elif [[ $sweep == micro && -n $sweep_ranks ]]; then
    die "--ranks applies to the scaling sweeps; the micro sweep runs on whole nodes (--nodes)"
  elif [[ $sweep != *-scaling && $sweep != micro && ( -n $sweep_ranks || -n $sweep_nodes ) ]]; then
    die "--ranks and --nodes apply to the scaling sweeps; the $sweep sweep runs on PB_NODES=$PB_NODES nodes of $profile_name"
  fi
  if [[ $sweep != strategy && -n $sweep_tp$sweep_pp$sweep_ep$sweep_experts$sweep_top_k ]]; then
    die "--tp, --pp, --ep, --experts and --top-k apply to the strategy sweep; give the $sweep sweep's app options after --"
  fi
  if [[ $sweep != layout && -n $sweep_gpu_memory ]]; then
    die "--gpu-memory applies to the layout sweep"
  fi
  if [[ $sweep != strategy && $sweep != sequence && -n $sweep_cp ]]; then
    die "--cp applies to the strategy sweep (a degree) and the sequence sweep (a list of degrees); give the $sweep sweep's app options after --"
  fi

  case $sweep in
    micro-batch)
      has_option --micro-batch "${app_args[@]}" && die "the micro-batch sweep sets --micro-batch; use --values"
      split_list "${sweep_values:-1,2,4,8}" values
      for value in "${values[@]}"; do
        is_count "$value" || die "--values: micro-batch '$value' is not a positive number"
        add_point "b$value" "${sweep_app:-fsdp}" "$nodes" "$tasks" --micro-batch "$value"
      done
      ;;
    shard)
      [[ -z $sweep_app || $sweep_app == fsdp ]] || die "the shard sweep runs fsdp, not $sweep_app"
      has_option --shard "${app_args[@]}" && die "the shard sweep sets --shard; use --values"
      has_option --shard-group "${app_args[@]}" && die "the shard sweep sets --shard-group (HYBRID_SHARD)"
      # HYBRID_SHARD shards within a node and replicates across nodes; on one node, within halves.
      local group=$tasks
      ((nodes > 1)) || group=$((ranks / 2))
      if [[ -n $sweep_values ]]; then
        split_list "$sweep_values" values
      elif ((group >= 2 && ranks / group >= 2)); then
        values=("${shard_strategies[@]}")
      else
        values=("${shard_strategies[@]:0:4}")
        echo "note: HYBRID_SHARD left out: $ranks ranks make no two shard groups of two ranks or more" >&2
      fi
      for value in "${values[@]}"; do
        [[ " ${shard_strategies[*]} " == *" $value "* ]] || die "--values: unknown shard strategy '$value'; known: ${shard_strategies[*]}"
        if [[ $value == HYBRID_SHARD ]]; then
          ((group >= 2 && ranks / group >= 2)) || die "HYBRID_SHARD needs two shard groups of two ranks or more; $ranks ranks have none"
          add_point "$value" fsdp "$nodes" "$tasks" --shard "$value" --shard-group "$group"
        else
          add_point "$value" fsdp "$nodes" "$tasks" --shard "$value"
        fi
      done
      ;;
    strategy)
      [[ -z $sweep_app ]] || die "the strategy sweep compares the apps of --values; --app does not apply"
      local tp=${sweep_tp:-$((tasks < ranks ? tasks : ranks))} pp=${sweep_pp:-$((tasks < ranks ? tasks : ranks))}
      is_count "$tp" || die "--tp $tp is not a positive number"
      is_count "$pp" || die "--pp $pp is not a positive number"
      local global_batch=()  # one global batch for every strategy: what plain dp takes
      has_option --global-batch "${app_args[@]}" || global_batch=(--global-batch $((micro_batch * ranks)))
      split_list "${sweep_values:-dp,fsdp,tp,pp,ep,cp}" values
      # ep: a mixture of experts; its all-to-all within a node, as tp's all-reduces. The ep groups are
      # consecutive dp ranks (dp = ranks), so the degree divides the ranks per node and the experts.
      local experts=${sweep_experts:-8} top_k=${sweep_top_k:-2} ep own
      is_count "$experts" || die "--experts $experts is not a positive number"
      is_count "$top_k" || die "--top-k $top_k is not a positive number"
      ep=${sweep_ep:-$(gcd $((tasks < ranks ? tasks : ranks)) "$experts")}
      is_count "$ep" || die "--ep $ep is not a positive number"
      if [[ " ${values[*]} " == *" ep "* ]]; then
        for own in --ep --experts --top-k; do
          has_option "$own" "${app_args[@]}" && die "the strategy sweep sets ep's $own; give the sweep's $own N before --"
        done
      fi
      # cp: each sequence split over cp consecutive ranks, its exchange of keys and values within a
      # node; the degree divides the ranks per node and splits the sequence into equal chunks.
      local cp=$sweep_cp
      if [[ -n $cp ]]; then
        is_count "$cp" || die "--cp $cp is not a positive number"
      elif [[ " ${values[*]} " == *" cp "* ]]; then
        model_shape
        local limit=$((tasks < ranks ? tasks : ranks))
        for ((cp = limit; cp > 1; cp--)); do
          ((limit % cp == 0)) && cp_takes "$cp" "$model_seq" && break
        done
      fi
      if [[ " ${values[*]} " == *" cp "* ]]; then
        has_option --cp "${app_args[@]}" && die "the strategy sweep sets cp's --cp; give the sweep's --cp N before --"
      fi
      for value in "${values[@]}"; do
        case $value in
          dp) add_point dp dp "$nodes" "$tasks" "${global_batch[@]}" ;;
          fsdp) add_point fsdp fsdp "$nodes" "$tasks" --shard FULL_SHARD "${global_batch[@]}" ;;
          tp) add_point "tp$tp" tp "$nodes" "$tasks" --tp "$tp" "${global_batch[@]}" ;;
          pp) add_point "pp$pp" pp "$nodes" "$tasks" --pp "$pp" "${global_batch[@]}" ;;
          ep) add_point "ep$ep" ep "$nodes" "$tasks" --experts "$experts" --top-k "$top_k" --ep "$ep" "${global_batch[@]}" ;;
          cp) add_point "cp$cp" cp "$nodes" "$tasks" --cp "$cp" "${global_batch[@]}" ;;
          *) die "--values: unknown app '$value'; known apps: ${sweep_apps[*]}" ;;
        esac
      done
      ;;
    layout)
      # The planner's fastest layouts of parabench-hybrid for this job, each run as one point.
      [[ -z $sweep_app || $sweep_app == hybrid ]] || die "the layout sweep runs hybrid, not $sweep_app"
      local own searched=(--tp --sequence-parallel --pp --schedule --virtual-stages --cp --cp-algo --cp-layout --dp
                          --shard --shard-group --no-prefetch --micro-batch --recompute --moe)
      for own in "${searched[@]}"; do
        has_option "$own" "${app_args[@]}" && die "the layout sweep sets $own (the planner's layouts); leave it out"
      done
      has_option --global-batch "${app_args[@]}" || die "the layout sweep needs --global-batch G after --: every layout trains it"
      local top=${sweep_values:-4} memory=${sweep_gpu_memory:-${PB_GPU_MEMORY_GIB:-}}
      is_count "$top" || die "--values: '$top' is not a positive number of layouts"
      [[ -n $memory ]] || die "the layout sweep needs --gpu-memory GIB (or PB_GPU_MEMORY_GIB in jobs/clusters/$profile_name.env)"
      # What the planner takes of the app arguments: the model, the batch and the precision.
      local plan_args=() i
      for ((i = 0; i < ${#app_args[@]}; i++)); do
        case ${app_args[i]} in
          --model|--layers|--hidden|--heads|--seq|--vocab|--ffn|--global-batch|--dtype|--grad-dtype|--backend)
            plan_args+=("${app_args[i]}" "${app_args[i + 1]:-}"); ((i += 1)) ;;
          --model=*|--layers=*|--hidden=*|--heads=*|--seq=*|--vocab=*|--ffn=*|--global-batch=*|--dtype=*|--grad-dtype=*|--backend=*)
            plan_args+=("${app_args[i]}") ;;
        esac
      done
      has_option --backend "${app_args[@]}" || plan_args+=(--backend "$( ((PB_GPUS_PER_NODE > 0)) && echo cuda || echo cpu)")
      [[ ${PB_PEAK_TFLOPS:-0} =~ ^0*(\.0*)?$ ]] || plan_args+=(--peak-tflops "$PB_PEAK_TFLOPS")
      local build=${PB_BUILD_DIR:-build} plan_bin table
      [[ $build == /* ]] || build=$repo/$build
      plan_bin=${PB_PLAN:-$build/bench/plan/parabench-plan}
      [[ -x $plan_bin ]] || die "the layout sweep asks the planner: $plan_bin is not there (build it, or set PB_PLAN)"
      table=$("$plan_bin" --app hybrid --search --gpus "$ranks" --gpus-per-node "$tasks" --gpu-memory "$memory" \
        --top "$top" --format csv "${plan_args[@]}" 2>&1) || die "parabench-plan --search: $table"
      local rank _ step args found=0 saved_tag=$sweep_tag layout_args
      while IFS=, read -r rank _ _ _ _ _ _ _ _ _ step _ _ _ _ _ args; do
        [[ $rank == rank ]] && continue  # the header
        read -r -a layout_args <<<"$args"
        # A pipeline's messages are matched by tag, which NCCL does not do: parabench-hybrid needs MPI there.
        if ((PB_GPUS_PER_NODE > 0)) && [[ " $args " != *" --pp 1 "* ]] && ! has_option --comm "${app_args[@]}"; then
          layout_args+=(--comm mpi)
        fi
        sweep_tag="planned_rank=$rank planned_step_s=$step${saved_tag:+ $saved_tag}"
        add_point "r$rank" hybrid "$nodes" "$tasks" "${layout_args[@]}"
        found=1
      done <<<"$table"
      sweep_tag=$saved_tag
      ((found)) || die "parabench-plan --search: no layout of the model fits $memory GiB on $ranks ranks"
      ;;
    sequence)
      # Long context: one model at growing sequence lengths, the cp degree growing with them, so that
      # each rank holds the same share of the sequence (values that double with cp 1, 2, 4, ...).
      [[ -z $sweep_app || $sweep_app == cp ]] || die "the sequence sweep runs cp, not $sweep_app"
      has_option --seq "${app_args[@]}" && die "the sequence sweep sets --seq; use --values"
      has_option --cp "${app_args[@]}" && die "the sequence sweep sets --cp; give the sweep's --cp LIST before --"
      has_option --dp "${app_args[@]}" && die "the sequence sweep runs dp 1 (each point on its cp ranks); drop --dp"
      split_list "${sweep_values:-1024,2048,4096,8192}" values
      local degrees=() largest=$((PB_MAX_NODES * PB_TASKS_PER_NODE)) previous=0 i cp capped=()
      if [[ -n $sweep_cp ]]; then
        IFS=, read -r -a degrees <<<"$sweep_cp"
        [[ ${#degrees[@]} -eq ${#values[@]} && $sweep_cp != *, ]] ||
          die "--cp $sweep_cp: give one cp degree per sequence length of --values (${#values[@]})"
        for cp in "${degrees[@]}"; do
          is_count "$cp" || die "--cp: '$cp' is not a positive number"
        done
      fi
      model_shape
      for i in "${!values[@]}"; do
        value=${values[i]}
        is_count "$value" || die "--values: sequence length '$value' is not a positive number"
        ((value > previous)) || die "--values: sequence lengths grow from point to point; $value follows $previous"
        previous=$value
        if [[ -n $sweep_cp ]]; then
          cp=${degrees[i]}
        else  # 1, 2, 4, ... no more than the largest job of the profile
          cp=$((1 << (i < 40 ? i : 40)))
          if ((cp > largest)); then
            cp=$largest
            capped+=("$value")
          fi
        fi
        cp_takes "$cp" "$value" || die "--values: cp $cp does not fit: $cp_rule; give other --values or --cp"
        allocation "$cp"
        add_point "s$value-cp$cp" cp "$alloc_nodes" "$alloc_tasks" --seq "$value" --cp "$cp"
      done
      [[ ${#capped[@]} -eq 0 ]] ||
        echo "note: cp stays at $largest (PB_MAX_NODES=$PB_MAX_NODES x PB_TASKS_PER_NODE=$PB_TASKS_PER_NODE of $profile_name) for sequence length(s) ${capped[*]}: their ranks hold more of the sequence" >&2
      ;;
    micro)
      # The collectives within a node, across two, and across the whole partition (as far as the
      # profile goes); the GEMMs and kernels come with every point, on each rank.
      [[ -z $sweep_app ]] || die "the micro sweep runs parabench-micro; --app does not apply"
      [[ -z $sweep_values ]] || die "the micro sweep takes --nodes, not --values"
      local counts=() largest=$PB_MAX_NODES
      if [[ -n $sweep_nodes ]]; then
        split_list "$sweep_nodes" values
        for value in "${values[@]}"; do
          is_count "$value" || die "--nodes: '$value' is not a positive number"
        done
        if ((${#values[@]} > 1)); then counts=("${values[@]}"); else largest=${values[0]}; fi
      fi
      if ((${#counts[@]} == 0)); then  # 1, 2 and all nodes, each once, none past the largest
        for value in 1 2; do
          ((value < largest)) && counts+=("$value")
        done
        counts+=("$largest")
      fi
      for value in "${counts[@]}"; do
        allocation $((value * PB_TASKS_PER_NODE))
        add_point "n$value" micro "$alloc_nodes" "$alloc_tasks"
      done
      ;;
    weak-scaling|strong-scaling)
      [[ -z $sweep_values ]] || die "the scaling sweeps take --ranks or --nodes, not --values"
      scaling_points
      local common=1 extra=()  # the least common multiple: every data-parallel degree divides it
      for value in "${scaling_ranks[@]}"; do common=$((common * value / $(gcd "$common" "$value"))); done
      if [[ $sweep == strong-scaling ]] && ! has_option --global-batch "${app_args[@]}"; then
        extra=(--global-batch $((micro_batch * common)))
      fi
      [[ $sweep == weak-scaling ]] && has_option --global-batch "${app_args[@]}" &&
        die "the weak-scaling sweep lets the global batch grow with the ranks; drop --global-batch"
      for value in "${scaling_ranks[@]}"; do
        allocation "$value"
        add_point "r$value" "${sweep_app:-dp}" "$alloc_nodes" "$alloc_tasks" "${extra[@]}"
      done
      ;;
  esac
}

# Prints the points as a table, one line per point (the sweep's points.tsv).
write_points() {
  local i
  printf 'index\tlabel\tapp\tnodes\tranks_per_node\targs\n'
  for i in "${!point_label[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "${point_label[i]}" "${point_app[i]}" "${point_nodes[i]}" \
      "${point_tasks[i]}" "${point_args[i]}"
  done
}
