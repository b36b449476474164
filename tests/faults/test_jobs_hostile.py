"""jobs/ against hostile paths, names and profiles (issue 11, item 8).

A newline in `jobs/submit --out` used to become a shell line of the rendered sbatch script, a space
split its unquoted `#SBATCH --output=`, and `jobs/run-local --cluster ../../x` sourced any `x.env`.
Now control characters in paths and names exit 2 with a message naming the option and the rule,
every rendered value is quoted (shell lines with printf %q, #SBATCH lines as sbatch parses them)
and profiles are found by name in jobs/clusters/ only.

Each test runs a copy of jobs/ in a scratch folder, with stand-ins for sbatch, mpiexec and the apps
on PATH and PB_BUILD_DIR: nothing runs MPI or Slurm, and planted profiles never touch the
repository. A planted command would create a marker file; no test may find one.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APPS = ("dp", "fsdp", "tp", "pp", "ep", "cp", "hybrid")

FAKE_SBATCH = """#!/usr/bin/env bash
# Stand-in for sbatch: records its arguments, answers a job id (--parsable).
printf '%s\\n' "$@" >>"$FAKE_SBATCH_LOG"
echo 4242
"""
FAKE_MPIEXEC = """#!/usr/bin/env bash
# Stand-in for mpiexec: 'mpiexec -n N PROGRAM ARGS' runs PROGRAM ARGS once.
[[ ${1:-} == --version ]] && { echo "fake mpiexec"; exit 0; }
[[ ${1:-} == -n ]] && shift 2
exec "$@"
"""
FAKE_APP = """#!/usr/bin/env bash
# Stand-in for parabench-APP: records its arguments, NUL-separated.
printf '%s\\0' "$@" >"${FAKE_APP_LOG:-/dev/null}"
"""


class Sandbox:
    """A copy of jobs/ (root/jobs), fake programs (bin/) and a fake build (build/bench/APP/)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.root = tmp / "repo"
        shutil.copytree(REPO / "jobs", self.root / "jobs")
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for name, text in (("sbatch", FAKE_SBATCH), ("mpiexec", FAKE_MPIEXEC)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.build = tmp / "build"
        for app in APPS:
            exe = self.build / "bench" / app / f"parabench-{app}"
            exe.parent.mkdir(parents=True)
            exe.write_text(FAKE_APP)
            exe.chmod(0o755)
        self.sbatch_log = tmp / "sbatch.log"
        self.app_log = tmp / "app.args"
        self.marker = tmp / "PWNED"

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "PB_", "PMI_"))}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", PB_BUILD_DIR=str(self.build),
                   FAKE_SBATCH_LOG=str(self.sbatch_log), FAKE_APP_LOG=str(self.app_log))
        env.update(extra)
        return env

    def run(self, *cmd, cwd=None, **extra_env):
        return subprocess.run([str(c) for c in cmd], env=self.env(**extra_env), cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=60)

    def tool(self, name):
        return self.root / "jobs" / name

    def plant(self, path):
        """A profile that, when sourced, creates the marker."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"touch '{self.marker}'\nPB_CLUSTER_NAME=planted\nPB_TASKS_PER_NODE=1\n")
        return path

    def profile(self, name, **values):
        """jobs/clusters/NAME.env: local.env with VALUES (bash-quoted) appended."""
        text = (self.root / "jobs" / "clusters" / "local.env").read_text()
        text += "".join(f"{k}={shell_quote(v)}\n" for k, v in values.items())
        (self.root / "jobs" / "clusters" / f"{name}.env").write_text(text)

    def app_args(self):
        return self.app_log.read_text().split("\0")[:-1]


def shell_quote(text):
    return subprocess.run(["bash", "-c", 'printf %q "$1"', "bash", text], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def sbatch_arguments(text):
    """The arguments sbatch reads from the rest of an #SBATCH line (src/sbatch/opt.c, _get_argument;
    checked against slurm-wlm 22.05): blanks separate arguments, ' and " quote, a backslash takes the
    next character as it is (also within quotes), an unquoted # ends the line."""
    args, i, n = [], 0, len(text)
    while True:
        while i < n and text[i].isspace() and text[i] != "\n":
            i += 1
        if i >= n or text[i] == "\n":
            return args
        arg, quote, escape = [], None, False
        while i < n and (quote or not text[i].isspace()) and text[i] != "\n":
            c = text[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif quote:
                if c == quote:
                    quote = None
                    continue
            elif c in "\"'":
                quote = c
                continue
            elif c == "#":
                args.append("".join(arg))
                return args
            arg.append(c)
        args.append("".join(arg))


def directives(script):
    """The arguments of each #SBATCH line before the first command, as sbatch reads them."""
    found = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            found.append(sbatch_arguments(line[len("#SBATCH"):]))
        elif line and not line.startswith("#"):
            break
    return found


def options(script):
    """{option: value} of the #SBATCH lines; each line must hold exactly one argument."""
    result = {}
    for args in directives(script):
        assert len(args) == 1, f"an #SBATCH line that sbatch reads as {args}:\n{script}"
        name, _, value = args[0].partition("=")
        result[name] = value
    return result


def assert_refused(done, *words, box=None):
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stdout == "", f"printed something for a refused command line:\n{done.stdout}"
    for word in words:
        assert word in done.stderr, f"{word!r} not in:\n{done.stderr}"
    if box:
        assert not box.marker.exists(), "the planted command ran"
        assert not box.sbatch_log.exists(), "sbatch was called"


# ---- jobs/submit --out --------------------------------------------------------------------------

@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_submit_refuses_a_newline_with_a_planted_command_in_out(box, dry_run):
    out = f"{box.tmp}/sweep\ntouch {box.marker}\n"
    done = box.run(box.tool("submit"), "micro-batch", "--cluster", "local", "--out", out,
                   *(["--dry-run"] if dry_run else []), "--", "--model", "tiny")
    assert_refused(done, "--out", "control characters", box=box)
    assert not (box.tmp / "sweep").exists()


@pytest.mark.parametrize("char", ["\r", "\t", "\x1b", "\x7f"], ids=["CR", "tab", "ESC", "DEL"])
def test_submit_refuses_other_control_characters_in_out(box, char):
    done = box.run(box.tool("submit"), "shard", "--cluster", "local", "--out", f"{box.tmp}/a{char}b", "--dry-run")
    assert_refused(done, "--out", "control characters", box=box)


def test_submit_quotes_an_awkward_out_and_tag_in_sbatch_lines_and_in_the_shell(box):
    """A space, quotes, #, %, $(...), backticks and ; in --out and --tag: submitted (fake sbatch),
    read back as sbatch reads #SBATCH lines, then the rendered script run as array task 0 through
    jobs/fsdp.sbatch and fake mpiexec: every value arrives unchanged and nothing in it ran."""
    planted = f"$(touch {box.marker}) `touch {box.marker}`; touch {box.marker}"
    out = box.tmp / f"my sweep 'one' \"two\" #3 100% {planted}"
    tag = f"run 'a' \"b\" #c {planted}"
    app_args = ["--model", "tiny", "--note", f"x #y {planted}"]
    done = box.run(box.tool("submit"), "micro-batch", "--cluster", "local", "--values", "1,2", "--out", out,
                   "--tag", tag, "--", *app_args)
    assert done.returncode == 0, done.stderr
    script_path = out / "array-1.sbatch"
    calls = box.sbatch_log.read_text().splitlines()
    array_call = calls.index(str(script_path))
    # Then the record job, after the array, with the directory as one argument (and in --output).
    record_call = calls[array_call + 1:]
    assert "--dependency=afterany:4242" in record_call
    assert record_call[record_call.index("--output") + 1] == str(out).replace("%", "%%") + "/record-%j.out"
    assert record_call[-2:] == [str(box.root / "jobs" / "lib" / "record-jobs.sh"), str(out)]
    assert (out / "record_job.txt").read_text() == "4242\n"
    script = script_path.read_text()

    opts = options(script)  # sbatch reads one argument per line, the whole directory in --output
    assert opts["--output"] == str(out).replace("%", "%%") + "/slurm-%A_%a.out"
    assert opts["--job-name"] == "pb-micro-batch" and opts["--array"] == "0-1%1"
    done = subprocess.run(["bash", "-n", str(script_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", str(script_path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout

    # The shell part, as Slurm would run it for task 0 (from the submit directory).
    done = box.run("bash", script_path, SLURM_ARRAY_TASK_ID="0")
    assert done.returncode == 0, done.stderr
    assert not box.marker.exists(), "a planted command ran"
    args = box.app_args()
    assert args[args.index("--micro-batch") + 1] == "1"
    assert args[args.index("--tag") + 1] == f"sweep=micro-batch point=b1 {tag}"
    assert args[args.index("--out") + 1] == f"{out}/b1"
    assert args[-len(app_args):] == app_args
    assert (out / "b1" / "command.txt").is_file() and (out / "b1" / "cluster.env").is_file()


FAKE_SCONTROL = """#!/usr/bin/env bash
# Stand-in for scontrol: a record for array task 4242_0 (a node failure) and none for 4242_1 (purged).
case "$*" in
  "show config") echo "AccountingStorageType   = accounting_storage/none" ;;
  *4242_0) echo "JobId=4243 ArrayJobId=4242 ArrayTaskId=0 JobName=pb JobState=NODE_FAIL Reason=NodeDown" \
                "ExitCode=0:15 DerivedExitCode=0:0 NodeList=n[1-2]" ;;
  *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
esac
"""


def test_record_jobs_keeps_each_points_end_and_says_which_record_is_gone(box):
    """jobs/lib/record-jobs.sh over a sweep directory with an awkward name (fake scontrol): the node
    failure's fields in jobs_end.tsv and its whole record beside the point's result; the purged one
    named in a warning, in its file and in the exit code; nothing in the directory's name ran."""
    planted = f"$(touch {box.marker}) `touch {box.marker}`; touch {box.marker}"
    out = box.tmp / f"my sweep 'one' #3 100% {planted}"
    out.mkdir(parents=True)
    (out / "jobs.tsv").write_text("job\tscript\tlabels\n4242\tarray-1.sbatch\tb1 b2\n")
    (box.bin / "scontrol").write_text(FAKE_SCONTROL)
    (box.bin / "scontrol").chmod(0o755)
    done = box.run(box.root / "jobs" / "lib" / "record-jobs.sh", out)
    assert done.returncode == 1, done.stderr
    assert "no record of job 4242_1 (b2)" in done.stderr
    rows = [line.split("\t") for line in (out / "jobs_end.tsv").read_text().splitlines()]
    assert rows == [["label", "job", "state", "exit_code", "nodes", "reason"],
                    ["b1", "4242_0", "NODE_FAIL", "0:15", "n[1-2]", "NodeDown"],
                    ["b2", "4242_1", "", "", "", ""]]
    assert "JobState=NODE_FAIL " in (out / "b1" / "slurm_job_end.txt").read_text()
    assert "Invalid job id" in (out / "b2" / "slurm_job_end.txt").read_text()
    assert not box.marker.exists()


def test_submit_refuses_a_backslash_in_out(box):
    # Slurm drops a backslash of an --output file name and stops expanding %A and %a.
    done = box.run(box.tool("submit"), "shard", "--cluster", "local", "--out", f"{box.tmp}/a\\b", "--dry-run")
    assert_refused(done, "--out", "backslash", box=box)


# ---- profiles: found by name only ---------------------------------------------------------------

def traversal(box):
    """A --cluster that climbs from jobs/clusters/ to a planted profile outside the repository."""
    planted = box.plant(box.tmp / "elsewhere" / "x.env")
    return os.path.relpath(planted.with_suffix(""), box.root / "jobs" / "clusters")


def hidden(box):
    box.plant(box.root / "jobs" / "clusters" / ".x.env")
    return ".x"


def absolute(box):
    return str(box.plant(box.tmp / "elsewhere" / "x.env").with_suffix(""))


@pytest.mark.parametrize("name", [traversal, hidden, absolute])
@pytest.mark.parametrize("tool", ["run-local", "run-local --sweep", "submit", "submit PB_CLUSTER",
                                  "run-local --sweep PB_CLUSTER", "dp.sbatch PB_CLUSTER"])
def test_a_profile_is_a_name_in_jobs_clusters_never_a_path(box, tool, name):
    cluster = name(box)
    env = {}
    if tool == "run-local":
        cmd = [box.tool("run-local"), "dp", "--cluster", cluster, "--", "--model", "tiny"]
    elif tool == "run-local --sweep":
        cmd = [box.tool("run-local"), "--sweep", "micro-batch", "--cluster", cluster, "--dry-run"]
    elif tool == "submit":
        cmd = [box.tool("submit"), "micro-batch", "--cluster", cluster, "--dry-run"]
    else:  # the profile from the environment
        env["PB_CLUSTER"] = cluster
        cmd = {"submit PB_CLUSTER": [box.tool("submit"), "micro-batch", "--dry-run"],
               "run-local --sweep PB_CLUSTER": [box.tool("run-local"), "--sweep", "micro-batch", "--dry-run"],
               "dp.sbatch PB_CLUSTER": ["bash", box.tool("dp.sbatch"), "--model", "tiny"]}[tool]
    done = box.run(*cmd, **env)
    option = "PB_CLUSTER" if "PB_CLUSTER" in tool else "--cluster"
    assert_refused(done, f"{option} '{cluster}' is not a profile name", "not starting with '.'", box=box)


# ---- control characters in the other names ------------------------------------------------------

NL = f"\ntouch {{marker}}\n"  # a newline and a planted command


@pytest.mark.parametrize("tool, args, env, option", [
    ("submit", ["micro-batch", "--cluster", "local", "--tag", f"a{NL}"], {}, "--tag"),
    ("submit", ["micro-batch", "--cluster", "local", "--tag=a\x1b[2Jb"], {}, "--tag"),
    ("submit", ["micro-batch", "--cluster", f"local{NL}"], {}, "--cluster"),
    ("submit", ["micro-batch"], {"PB_CLUSTER": f"local{NL}"}, "PB_CLUSTER"),
    ("submit", ["micro-batch", "--cluster", "local", "--app", f"fsdp{NL}"], {}, "--app"),
    ("submit", ["micro-batch", "--cluster", "local", "--values", f"1,2{NL}"], {}, "--values"),
    ("submit", [f"shard{NL}", "--cluster", "local"], {}, "SWEEP"),
    ("submit", ["shard", "--cluster", "local", "--time", f"00:10:00{NL}"], {}, "--time"),
    ("run-local --sweep", ["micro-batch", "--tag", f"a{NL}"], {}, "--tag"),
    ("run-local --sweep", ["micro-batch", "--out", f"{{tmp}}/o{NL}"], {}, "--out"),
    ("run-local --sweep", ["micro-batch", "--cluster", f"local{NL}"], {}, "--cluster"),
    ("run-local", ["dp", "--cluster", f"local{NL}"], {}, "--cluster"),
    ("run-local", [f"dp{NL}"], {}, "APP"),
    ("run-local", ["dp", "-n", f"2{NL}"], {}, "-n"),
    ("dp.sbatch", ["--model", "tiny"], {"PB_OUT": f"{{tmp}}/o{NL}"}, "PB_OUT"),
    ("dp.sbatch", ["--model", "tiny"], {"PB_CLUSTER": f"local{NL}"}, "PB_CLUSTER"),
])
def test_control_characters_in_names_exit_2_naming_the_option(box, tool, args, env, option):
    fill = {"marker": box.marker, "tmp": box.tmp}
    args = [a.format(**fill) for a in args]
    env = {k: v.format(**fill) for k, v in env.items()}
    if tool == "dp.sbatch":
        cmd = ["bash", box.tool("dp.sbatch"), *args]
    elif tool == "run-local --sweep":
        cmd = [box.tool("run-local"), "--sweep", *args, "--dry-run"]
    elif tool == "run-local":
        cmd = [box.tool("run-local"), *args]
    else:
        cmd = [box.tool(tool), *args, "--dry-run"]
    done = box.run(*cmd, **env)
    assert_refused(done, f"{option}: control characters", "not allowed in paths and names", box=box)
    assert not box.app_log.exists(), "the app ran"


# ---- profile values rendered into #SBATCH lines -------------------------------------------------

def test_submit_quotes_profile_values_in_sbatch_lines(box):
    box.profile("odd", PB_PARTITION="gpu nodes", PB_ACCOUNT="proj \"x\" #1 'y'",
                PB_SBATCH_ARGS="--exclusive  --comment=a#b\t--qos=it's\n--constraint=a|b")
    done = box.run(box.tool("submit"), "shard", "--cluster", "odd", "--dry-run")
    assert done.returncode == 0, done.stderr
    script = done.stdout.split("----\n", 1)[1]
    opts = options(script)
    assert opts["--partition"] == "gpu nodes"
    assert opts["--account"] == "proj \"x\" #1 'y'"
    assert opts["--comment"] == "a#b" and opts["--qos"] == "it's" and opts["--constraint"] == "a|b"
    assert "--exclusive" in opts


@pytest.mark.parametrize("variable, value", [
    ("PB_PARTITION", "gpu\ntouch {marker}"),
    ("PB_ACCOUNT", "proj\rx"),
    ("PB_CLUSTER_NAME", "odd\ntouch {marker}"),
    ("PB_SBATCH_ARGS", "--exclusive --qos=a\x1bb"),
])
def test_submit_refuses_control_characters_in_profile_values(box, variable, value):
    box.profile("odd", **{variable: value.format(marker=box.marker)})
    done = box.run(box.tool("submit"), "shard", "--cluster", "odd", "--dry-run")
    assert_refused(done, f"{variable} in jobs/clusters/odd.env: control characters", box=box)
