"""``hpctrain train | simulate | bench | report | info | horovodrun``: the command line.

Arguments are parsed and validated before MPI starts, so bad input is one line and a non-zero
exit on every rank, never a hang. MPI is then initialised at the thread level the algorithm
needs (see :mod:`hpctrain.comm`).
"""

from __future__ import annotations

import sys

# ``python -m hpctrain.cli`` records SIGUSR1 (a time limit's warning) before the imports below
# load torch, as ``python -m hpctrain`` does.
if __name__ == "__main__":
    from hpctrain.checkpoint import stop

    stop.install_for(sys.argv[1:])

import argparse
import codecs
import importlib
import json
import os
import socket
import stat
import tempfile
import textwrap
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpctrain import (
    arguments,
    checkpoint,
    comm,
    compiled,
    devices,
    horovodrun,
    job_end,
    kernels,
    launch_env,
    paths,
    provenance,
    run,
)
from hpctrain.bench.report import rendering as bench_report
from hpctrain.config import CheckpointConfig, RunConfig
from hpctrain.errors import Parser, UsageError
from hpctrain.metrics import summary_table
from hpctrain.options import command_line, dash_values
from hpctrain.result import Summary
from hpctrain.shuffle.options import DEFAULT_CHUNK_MB
from hpctrain.sim import arguments as sim_arguments

# Benchmark name -> module with DESCRIPTION, THREAD_LEVEL, add_arguments, run (and optionally
# validate(args), called before MPI starts).
BENCHMARKS: dict[str, str] = {
    "compare": "hpctrain.bench.compare",
    "allreduce": "hpctrain.bench.allreduce",
    "kernel": "hpctrain.bench.kernel",
    "store": "hpctrain.bench.store",
    "shuffle": "hpctrain.bench.shuffle",
}


class _HelpFormatter(argparse.HelpFormatter):
    """Adds an option's default to its help, unless empty or already said."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None
                or default is False or default == [] or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


STOPPED_ON_COLLAPSE = 4  # exit status of a run --stop-on-collapse ended


class _Version(argparse.Action):
    """``--version``: hpctrain's version and, where known, the commit it runs from or was
    built from (what a run's config.json records as ``hpctrain_commit``): the version alone
    does not tell two builds apart."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show hpctrain's version (and commit) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        commit = provenance.commit().get("hpctrain_commit")
        print(f"hpctrain {sys.modules['hpctrain'].__version__}"
              + (f" (commit {commit})" if commit else ""))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hpctrain", description="distributed PyTorch training over MPI: "
                    "train, simulate many workers in one process, benchmark and compare")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = sub.add_parser("train", help="train a model with one algorithm",
                           formatter_class=_HelpFormatter)
    arguments.add_arguments(train)
    simulate = sub.add_parser("simulate", help="train as K workers would, in one process: "
                              "virtual workers, virtual time, the real algorithm code",
                              formatter_class=_HelpFormatter)
    arguments.add_arguments(simulate)
    sim_arguments.add_arguments(simulate)
    sim_arguments.hide_refused(simulate)
    for each in (train, simulate):  # an unknown flag there may be a user algorithm's
        assert isinstance(each, Parser)
        each.unknown_hint = arguments.unknown_option_hint
    benchmarks = {name: importlib.import_module(m) for name, m in BENCHMARKS.items()}
    bench = sub.add_parser(
        "bench", help="benchmarks, each against a baseline measured in the same run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join([
            textwrap.fill("Each benchmark measures one thing against a baseline measured in the "
                          "same run, prints a table and writes JSON.", 79),
            *(textwrap.fill(f"{name}: {m.DESCRIPTION}", 79, subsequent_indent="  ")
              for name, m in benchmarks.items())]))
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, parser_class=Parser)
    for name, module in benchmarks.items():
        b = bench_sub.add_parser(name, help=module.DESCRIPTION.split(". ")[0].split(": ")[0],
                                 description=module.DESCRIPTION,
                                 formatter_class=_HelpFormatter)
        module.add_arguments(b)
    for each in (parser, bench, *bench_sub.choices.values()):  # as train's: see dash_values
        dash_values(each)
    report = sub.add_parser("report", help="re-render a comparison's report.md and plots from "
                            "its saved outputs, rerunning nothing")
    bench_report.add_arguments(report)
    sub.add_parser("info", help="MPI library, torch, Horovod and kernel availability")
    horovodrun.add_arguments(sub.add_parser("horovodrun", help=horovodrun.SUMMARY,
                                            description=horovodrun.description()))
    return parser


def train(args: argparse.Namespace) -> Summary:
    """``hpctrain train``: the configuration from the options, checked before MPI starts."""
    rank = comm.env_rank()  # the launcher's rank: under torchrun MPI would say 0 everywhere
    if not checkpoint.stop.installed():  # the entry points have, before importing torch
        checkpoint.stop.install()  # SIGUSR1: a checkpoint and a stop where it can, else nothing
    try:
        config, given = arguments.build_given(args)
        arguments.note_other_workers(args.config, config)
        summary = run.checked_first(config, given)
    except checkpoint.Stopped as stopped:  # every worker, after the same checkpoint
        checkpoint.stop.forget()  # acted on: a script's next main() starts without it
        if rank == 0:
            print(f"hpctrain: {stopped}", file=sys.stderr, flush=True)
        sys.exit(checkpoint.stop.EXIT_STATUS)
    if rank == 0:
        say_out(f"hpctrain train: finished\n{summary_table(summary)}")
    _exit_if_collapsed(summary, rank)
    return summary


def simulate(args: argparse.Namespace) -> dict:
    """``hpctrain simulate``: the same options as train, plus the simulator's; no MPI."""
    from hpctrain.sim import simulate as run_simulation

    sim_arguments.refuse_real_run_only(args)
    summary = run_simulation(_without_real_run_settings(args, arguments.build(args)),
                             sim_arguments.build(args))
    say_out(f"hpctrain simulate: finished (virtual times)\n{summary_table(summary)}")
    _exit_if_collapsed(summary, 0)
    return summary


def _without_real_run_settings(args: argparse.Namespace, config: RunConfig) -> RunConfig:
    """A real run's ``config.json`` given to ``simulate --config`` without the settings that
    only a real run has (checkpoints: a simulation is rerun, not resumed; ``--eval-rank``'s
    extra rank; ``--profile``'s one profiler per process; sharded data, whose samples and
    order are replicated data's; a ``--sync-backend`` other than mpi, whose order of adding
    the simulation does not follow), said once; typed ones are refused by the simulator's
    checks, as without ``--config``."""
    left = []
    if not any(hasattr(args, f"checkpoint.{name}") for name in ("every", "dir", "resume")) \
            and config.checkpoint != CheckpointConfig():
        config = replace(config, checkpoint=CheckpointConfig())
        left.append("checkpoint settings")
    for name in ("eval_rank", "profile"):
        if not hasattr(args, name) and getattr(config, name) is not None:
            cleared: dict[str, Any] = {name: None}
            config = replace(config, **cleared)
            left.append(f"--{name.replace('_', '-')}")
    if not hasattr(args, "data.data_placement") and config.data.data_placement == "sharded":
        # each rank's part of the data: the same samples, in the same order, as replicated
        config = replace(config, data=replace(config.data, data_placement="replicated",
                                              shuffle_chunk_mb=DEFAULT_CHUNK_MB))
        left.append("--data-placement sharded")
    if left:
        print(f"hpctrain simulate: leaving out {args.config}'s {' and '.join(left)} (a real "
              "run's only)", file=sys.stderr, flush=True)
    backend = getattr(config.algorithm, "sync_backend", "mpi")
    if backend != "mpi" and not hasattr(args, "algorithm.sync_backend"):  # typed: refused
        assert config.algorithm is not None  # RunConfig fills in its algorithm's defaults
        mpi: dict[str, Any] = {"sync_backend": "mpi"}  # a field of some algorithms' options
        config = replace(config, algorithm=replace(config.algorithm, **mpi))
        print(f"hpctrain simulate: leaving out {args.config}'s --sync-backend {backend}: the "
              f"virtual workers add as --sync-backend mpi does, so the final model is an mpi "
              f"run's bit for bit, and a {backend} run's to rounding only",
              file=sys.stderr, flush=True)
    return config


def say_out(text: str) -> None:
    """``text`` on stdout. A stdout that cannot take it (``> log`` on a full disk, the run's
    outputs already written) is named in the error, which said only "No space left"."""
    try:
        print(text, flush=True)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, "<stdout>") from None


def _exit_if_collapsed(summary: Mapping[str, Any], rank: int) -> None:
    """Every rank of a run --stop-on-collapse ended: a non-zero exit (its outputs are kept)."""
    if summary.get("stopped_on_collapse"):
        if rank == 0:
            print(f"hpctrain: error: stopped (--stop-on-collapse): training collapsed at update "
                  f"{summary['collapsed_at']}: {summary['collapse_reason']}; outputs in "
                  f"{os.path.abspath(summary['out'])}", file=sys.stderr, flush=True)
        sys.exit(STOPPED_ON_COLLAPSE)


def info() -> None:
    # Before MPI starts, as train's devices.check: read once it runs, a misspelt override was
    # every rank's error and MPI_ABORT. Rank 0's one line speaks for all.
    devices.cuda_aware_override()
    machine = provenance.machine()  # git's fork before MPI, as a run asks it
    MPI = comm.init("multiple")
    launched = launch_env.launch()  # as training reads it (comm.launcher)
    if launched.kind == "torchrun":  # each worker is an MPI world of its own
        rank, size, local_size, placed = _placed_by_torch()
    else:
        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        local_size = comm.local_size()  # collective: every rank takes part
        placed = MPI.COMM_WORLD.gather(_placement(rank), root=0)
    if rank != 0:
        return
    assert placed is not None  # gathered on rank 0
    described = devices.describe()
    facts = {**machine, **described,
             "cuda_aware_mpi_forced_by": _cuda_aware_forced_by(),
             **comm.library_info(), "ranks": size, "local_size": local_size,
             "launcher": launched.by,
             "placement": [where for where, _ in placed],
             "ranks_share_a_gpu": devices.shares_gpus([(w["host"], w["local_rank"], visible)
                                                       for w, visible in placed]),
             "compile": compiled.problem(devices.resolve("auto")) or "yes",
             **kernel_facts(described["cuda"])}
    try:
        import horovod

        facts["horovod"] = horovod.__version__
    except ImportError as e:
        facts["horovod"] = f"not importable ({e})"
    print(json.dumps(facts, indent=2))


def _placed_by_torch() -> tuple[int, int, int | None, list | None]:
    """Under torch's launch: this worker's rank, the job's size and, on rank 0, the workers
    on its node and every worker's :func:`_placement`, gathered over the group training
    uses (the same rendezvous, torchrun's restarts included)."""
    from hpctrain.torch_comm import TorchComm

    world = TorchComm()
    try:
        rank, size = world.Get_rank(), world.Get_size()
        placed = world.gather(_placement(rank), root=0)
    finally:
        world.Free()
    if placed is None:
        return rank, size, None, None
    return rank, size, sum(w["host"] == placed[0][0]["host"] for w, _ in placed), placed


def _placement(rank: int) -> tuple[dict, list[str]]:
    """This rank's host, local rank, the CPUs it may run on (its affinity: the launcher's
    binding) and the device ``--device auto`` gives it (a GPU: its index and identity), with
    the GPUs it sees: what a wrong binding shows up in."""
    where = {"rank": rank, "host": socket.gethostname(), "local_rank": devices.local_rank(),
             "cpus": launch_env.usable_cpus(), "device": "cpu"}
    visible = devices.visible_gpus()
    if devices.resolve("auto") == "cuda":
        gpu = devices.local_gpu()
        where.update(device=str(gpu), gpu=visible[gpu.index])
    return where, visible


def kernel_facts(gpu: bool) -> dict[str, str | bool]:
    """info's kernel keys: ``kernel_cpu`` and ``kernel_cuda``, ``yes`` where the library was
    built (and loads), else why not; and ``kernel_cuda_usable``, whether this machine can
    run the CUDA one (built, and ``gpu``: torch sees one). A key of its own: ``kernel_cuda:
    "yes"`` beside ``cuda: false`` read as usable, and its value stays what the docs say."""
    cuda = _loads(kernels.cuda_library)
    return {"kernel_cpu": _loads(kernels.cpu_library), "kernel_cuda": cuda,
            "kernel_cuda_usable": cuda == "yes" and gpu}


def _loads(library) -> str:
    """``yes`` when DC-ASGD's compensation kernel ``library`` loads, else why not."""
    try:
        library()
    except (RuntimeError, OSError) as e:
        return str(e)
    return "yes"


def _cuda_aware_forced_by() -> str | None:
    """info's ``cuda_aware_mpi_forced_by``: the ``HPCTRAIN_CUDA_AWARE_MPI=...`` that decides
    ``cuda_aware_mpi`` instead of the library, None where the library answers. A key of its
    own keeps ``cuda_aware_mpi`` a bool (it was a string when forced, breaking ``is True``)."""
    if devices.cuda_aware_override() is None:  # as devices.cuda_aware_mpi reads it
        return None
    return f"{devices._AWARE_ENV}={os.environ[devices._AWARE_ENV]}"


def _not_a_record(path: Path) -> str | None:
    """Why the file at ``path`` may not be replaced by a benchmark's results, or None: it may
    if it is empty or a JSON document (an earlier run's record, measured again). Anything
    else is a file of the user's that a mistyped ``--json`` (``--json /etc/passwd`` in a
    review's fuzzing) replaced whole."""
    try:
        if path.stat().st_size > _LARGEST_RECORD:
            return f"is over {_LARGEST_RECORD // 2**20} MiB, no benchmark's record"
        text = path.read_bytes()
    except OSError as error:
        return f"cannot be read to see what it holds ({error.strerror})"
    try:
        if text.strip():
            json.loads(text)
    except ValueError:  # UnicodeDecodeError is one
        return "holds something other than JSON"
    return None


def _check_json_path(path: str | None) -> None:
    """A benchmark's ``--json`` file must be writable where asked before it measures: a missing
    folder, or one where no file can be made (``/proc``, read-only), found at the end would
    lose the figures. The file is written to a temporary one beside it, then renamed, so the
    test is making a file in its folder (:func:`hpctrain.run_folders.check_folder` makes a
    folder). A symbolic link is followed (its target is written, in the target's folder);
    what is there already must be a regular file (the rename would replace a FIFO or a
    device node) that is empty or holds JSON (:func:`_not_a_record`)."""
    if path is None:
        return
    if not str(path).strip():  # "" was the working folder: "--json : is a folder"
        raise UsageError(f"--json {path!r} is empty: give a file")
    if problem := paths.too_long(str(path)):  # was the stat's OSError (ENAMETOOLONG), exit 1
        raise UsageError(f"--json {paths.shortened(str(path))}: {problem}")
    target, followed = Path(path), Path(path).is_symlink()
    if followed:  # as metrics.write_json_atomic writes it
        target = Path(os.path.realpath(target))
    try:
        kind = stat.S_IFMT(os.stat(target).st_mode)
    except (FileNotFoundError, NotADirectoryError):  # a new file (a link's new target), or
        kind = None  # its folder is missing or a file: said below
    except OSError as error:  # a loop of links, a folder that cannot be searched
        raise UsageError(f"--json {path}: {error.strerror}") from None
    if kind == stat.S_IFDIR:
        raise UsageError(f"--json {path}: is a folder")
    if kind is not None and kind != stat.S_IFREG:  # the rename would put a file in its place
        raise UsageError(f"--json {path}: {f'its target {target} ' if followed else ''}is "
                         f"{_FILE_KINDS.get(kind, 'something else')}, not a regular file")
    if kind == stat.S_IFREG and (why := _not_a_record(target)):
        raise UsageError(f"--json {path}: {f'its target {target} ' if followed else 'it '}"
                         f"{why}, and the results would replace it: remove it, or name "
                         "another file")
    if not target.parent.is_dir():
        raise UsageError(f"--json {path}: no folder {target.parent}")
    try:  # nothing is left behind
        handle, name = tempfile.mkstemp(prefix=".hpctrain-check-", dir=target.parent)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise UsageError(f"--json {path}: cannot write a file in {target.parent} "
                         f"({error.strerror})") from None


_LARGEST_RECORD = 64 * 2**20  # bytes: a benchmark's JSON is some kB
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _console_safe() -> None:
    """Let stdout and stderr write any text where their encoding is not a UTF one (a Latin-1
    or C locale): what cannot be encoded is written as ``\\u2014`` escapes instead of a
    UnicodeEncodeError that failed a finished comparison's table (its "—") with exit 1.
    Files hpctrain writes (report.md, JSON) are UTF-8 whatever the locale."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            utf = codecs.lookup(encoding).name.startswith("utf")
        except LookupError:
            utf = False
        if not utf and hasattr(stream, "reconfigure"):  # a TextIOWrapper (not a test's io)
            stream.reconfigure(errors="backslashreplace")


@command_line()  # refusals name the flags typed (--lr -1), the Python API's its fields
def main(argv: list[str] | None = None) -> None:
    _console_safe()
    job_end.install_abort_on_error()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["simulate"]) or argv[:2] == ["bench", "compare"]:
        arguments.load_named_algorithms(argv)  # a user's algorithm: its options are flags
    args = build_parser().parse_args(argv)
    if args.command == "horovodrun":  # becomes mpirun: nothing else to start
        horovodrun.run(args)
    import torch

    # Training sets --threads itself; benchmarks theirs (bench kernel's --threads is a list).
    torch.set_num_threads(1)
    if args.command == "train":
        train(args)
    elif args.command == "simulate":
        simulate(args)
    elif args.command == "bench":
        module = importlib.import_module(BENCHMARKS[args.benchmark])
        _check_json_path(getattr(args, "json", None))
        if hasattr(module, "validate"):  # checks the options' own types cannot make
            module.validate(args)
        if module.THREAD_LEVEL is not None:  # None: a launcher of MPI jobs (compare)
            devices.cuda_aware_override()  # before MPI, as info and train check it
            provenance.commit()  # git's fork before MPI: the figures' machine record
            comm.init(module.THREAD_LEVEL)
        module.run(args)
    elif args.command == "report":
        bench_report.run(args)
    elif args.command == "info":
        info()


if __name__ == "__main__":
    try:
        main()
    finally:
        checkpoint.stop.ignore_from_now()  # the process ends: no signal may end it on the way
