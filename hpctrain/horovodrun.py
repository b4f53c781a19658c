"""``hpctrain horovodrun``: Horovod's launcher's command line, started through the MPI's own mpirun.

A job script leaving Horovod says ``horovodrun -np 4 -H a:2,b:2 python train.py``, and with
Horovod gone there is no ``horovodrun``. This takes the same flags and starts the same
processes the way horovodrun's MPI mode does, on Open MPI (``mpirun -np N -H hosts -bind-to
none -map-by slot``, every environment variable exported with ``-x``) or on a Hydra mpirun,
MPICH's or Intel MPI's (``mpirun -l -np N -hosts ...``, the environment passed as Hydra
does), and Horovod's tuning flags and ``--config-file`` become the ``HOROVOD_*`` variables
the ranks read (:mod:`hpctrain.horovod_settings`). So a script changes ``horovodrun`` to
``hpctrain horovodrun`` and nothing else. Gloo mode and elastic mode (``--min-np``,
``--host-discovery-script``) are refused in one line: hpctrain's backends need an MPI (or
torchrun) launch, and its elastic recovery is a restart.

:func:`mpirun_command` is the whole translation, pure; :func:`run` replaces this process with
mpirun, so its exit status and signals are the job's (Intel MPI's mpirun, a script that would
not pass signals on, with the ``mpiexec.hydra`` it runs:
:func:`hpctrain.mpirun.passing_signals`). ``python -m hpctrain horovodrun`` comes here before
anything imports torch (:func:`main`): a launcher need not pay for it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from hpctrain import horovod_settings
from hpctrain.errors import Parser, UsageError
from hpctrain.mpirun import FLAVOURS, flavour_of, passing_signals

# Flags of horovodrun's elastic mode (it re-forms the job itself; here a launcher restarts it).
ELASTIC_FLAGS = ("--min-np", "--max-np", "--slots-per-host", "--host-discovery-script",
                 "--elastic-timeout", "--reset-limit", "--blacklist-cooldown-range")
# The two that start that mode; without them horovodrun ignores the others, and so does this.
ELASTIC_STARTS = ("--min-np", "--host-discovery-script")
# From this many hosts on, horovodrun has Open MPI's ssh start every host from the launcher.
LARGE_CLUSTER = 64
# --mpi-args words that change where mpirun looks for the program: it is not checked then.
_MOVES_PROGRAM = ("-wdir", "--wdir", "-path", "--path", "-s", "--preload-binary")
# One line for ``hpctrain --help`` and this command's own.
SUMMARY = "horovodrun's command line, started through the MPI's own mpirun"


def _dest(flag: str) -> str:
    """Where argparse keeps an elastic flag's value (``--min-np``: ``elastic_min_np``)."""
    return "elastic_" + flag[2:].replace("-", "_")


_HOST = re.compile(r"^([^\s:,]+):([1-9][0-9]*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What horovodrun never exports (its env.IGNORE_REGEXES): the launcher's GPU list is its own
# host's, each host's ranks keep theirs; OLDPWD and Horovod's job key mean nothing elsewhere.
_NOT_EXPORTED = re.compile(r"^(BASH_FUNC_|OLDPWD|_HOROVOD_SECRET_KEY|.*CUDA_VISIBLE_DEVICES)")


def description() -> str:
    """The module's second paragraph, as one paragraph of ``--help``."""
    return __doc__.split("\n\n")[1].replace("\n", " ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hpctrain import __version__

    parser.add_argument("-v", "--version", action="version", version=f"hpctrain {__version__}")
    parser.add_argument("-np", "--num-proc", dest="np", type=int,
                        help="number of processes (ranks); needed unless --check-build")
    parser.add_argument("-cb", "--check-build", action="store_true",
                        help="show what hpctrain offers in horovodrun's terms, and exit")
    parser.add_argument("--config-file", help="horovodrun's YAML file of tuning settings "
                        "(a flag given here wins over the file)")
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("-H", "--hosts", help="host:slots,... (default: localhost:NP)")
    hosts.add_argument("-hostfile", "--hostfile",
                       help="a file of 'host slots=N' lines (max_slots=M taken too), as "
                            "Open MPI and Horovod read it")
    parser.add_argument("-p", "--ssh-port", type=_port, help="ssh port of the other hosts")
    parser.add_argument("-i", "--ssh-identity-file", help="ssh key for the other hosts")
    parser.add_argument("--network-interface", "--network-interfaces", dest="nics",
                        action="append", help="interfaces MPI's TCP traffic may use: "
                        "comma-separated, or the flag given once per interface")
    parser.add_argument("--tcp", action="store_true",
                        help="no InfiniBand for NCCL (NCCL_IB_DISABLE=1)")
    parser.add_argument("--mpi-args", default="", help="more mpirun arguments, one string")
    parser.add_argument("--binding-args", help="mpirun's binding and mapping flags, one string, "
                        "in place of '-bind-to none -map-by slot'")
    parser.add_argument("--output-filename", help="each rank's output to files under this "
                        "folder (Open MPI: DIR/1/rank.N/; Hydra: DIR/rank.N.stdout, .stderr)")
    parser.add_argument("-prefix-timestamp", "--prefix-output-with-timestamp",
                        action="store_true", help="a timestamp on every output line "
                        "(Open MPI's --timestamp-output)")
    horovod_settings.add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="print the mpirun command first")
    # horovodrun's own pre-launch checks (ssh to every host, common interfaces) and their
    # cache; hpctrain horovodrun leaves those to mpirun, so the flags change nothing.
    parser.add_argument("--start-timeout", type=int, help="accepted; no effect here")
    parser.add_argument("--disable-cache", action="store_true", help="accepted; no effect here")
    parser.add_argument("--mpi", action="store_true", help="MPI mode (the only one here)")
    parser.add_argument("--gloo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jsrun", action="store_true", help=argparse.SUPPRESS)
    parser.epilog = (f"horovodrun's elastic flags ({', '.join(ELASTIC_FLAGS)}) are not listed: "
                     f"{' and '.join(ELASTIC_STARTS)}, which start its elastic mode, are refused "
                     "(a lost worker ends the job; a restart resumes: README), and the others "
                     "are ignored without them, as horovodrun ignores them")
    for flag in ELASTIC_FLAGS:
        aliases = [flag.replace("-np", "-num-proc")] if flag.endswith("-np") else []
        parser.add_argument(flag, *aliases, dest=_dest(flag), help=argparse.SUPPRESS,
                            nargs=2 if flag == "--blacklist-cooldown-range" else None,
                            type=str if flag == "--host-discovery-script" else int)
    parser.add_argument("program", nargs=argparse.REMAINDER, metavar="command",
                        help="the program and its arguments, e.g. python train.py")


def slots(hosts: str) -> list[tuple[str, int]]:
    """``host:slots,...`` as pairs; a host without ``:slots`` has one, as Open MPI's ``-H``
    has it (horovodrun 0.28 refuses such a host)."""
    out = []
    for entry in hosts.split(","):
        m = _HOST.match(entry if ":" in entry else f"{entry}:1")
        if not m:
            raise UsageError(f"-H {hosts!r}: {entry!r} is not host or host:slots (slots >= 1)")
        out.append((m.group(1), int(m.group(2))))
    return out


def _port(text: str) -> int:
    """A TCP port, 1-65535 (0 was dropped without a word, -5 passed on to ssh)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return port


def hostfile_slots(path: str) -> list[tuple[str, int]]:
    """The hosts of a hostfile: ``host slots=N`` lines (``#`` comments, blank lines; Open
    MPI's ``max_slots=M`` and spaces around ``=`` too)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"--hostfile {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--hostfile {path!r}: not UTF-8 text") from None
    out = []
    for line in lines:
        words = re.sub(r"\s*=\s*", "=", line.split("#", 1)[0]).split()
        if not words:
            continue
        keys = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        slots, most = keys.get("slots", "1"), keys.get("max_slots", "")
        if any("=" not in w for w in words[1:]) or set(keys) - {"slots", "max_slots"} \
                or not re.fullmatch(r"[1-9][0-9]*", slots) \
                or most and not re.fullmatch(r"[1-9][0-9]*", most):
            raise UsageError(f"--hostfile {path!r}: {line.strip()!r} is not 'host slots=N' "
                             "(and max_slots=M)")
        out.append((words[0], int(slots)))
    if not out:
        raise UsageError(f"--hostfile {path!r}: no hosts")
    return out


def check(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Refuse what horovodrun's MPI mode would not start, or hpctrain cannot; the hosts.
    Their slots are checked on Open MPI only: Hydra's mpirun, under horovodrun too, places
    more processes than slots round the hosts again."""
    if args.jsrun:
        raise UsageError("--jsrun: hpctrain horovodrun starts MPI jobs through mpirun; under "
                         "LSF run jsrun yourself (hvd.init() reads the MPI world it starts)")
    if args.gloo:
        raise UsageError("--gloo: hpctrain horovodrun starts MPI jobs only; for a launch "
                         "without MPI use torchrun (hvd.init() starts the torch backend there)")
    elastic = [f for f in ELASTIC_STARTS if getattr(args, _dest(f)) is not None]
    if elastic:
        raise UsageError(f"{elastic[0]}: horovodrun's elastic mode is not here; a lost worker "
                         "ends the job and a restart (torchrun --max-restarts, sbatch --requeue) "
                         "resumes from HPCTRAIN_ELASTIC_DIR (README, Horovod-compatible API)")
    if args.np is None:
        raise UsageError("-np: the number of processes is needed (or --check-build)")
    if not 1 <= args.np < 2**31:  # MPI numbers ranks with a C int
        raise UsageError(f"-np {args.np}: want at least 1 process and fewer than 2**31")
    if not args.program:
        raise UsageError("no command to run: hpctrain horovodrun -np N python train.py")
    return (hostfile_slots(args.hostfile) if args.hostfile
            else slots(f"localhost:{args.np}" if args.hosts is None else args.hosts))


def _check_slots(args: argparse.Namespace, hosts: list[tuple[str, int]],
                 environ: Mapping[str, str]) -> None:
    """More processes than slots, refused in one line where Open MPI's mpirun would refuse
    them in a screenful: not when it is told to oversubscribe (``--mpi-args=--oversubscribe``,
    ``OMPI_MCA_rmaps_base_oversubscribe``), which horovodrun's jobs may rely on."""
    total = sum(n for _, n in hosts)
    words = f"{args.mpi_args} {args.binding_args}".lower()
    if (args.np > total and "oversubscribe" not in words
            and "OMPI_MCA_rmaps_base_oversubscribe" not in environ):
        raise UsageError(f"-np {args.np}: more processes than the {total} slots of the hosts "
                         "(--mpi-args=--oversubscribe starts them anyway)")


def variables(args: argparse.Namespace) -> dict[str, str]:
    """The variables horovodrun sets for the ranks: the tuning flags over ``--config-file``,
    ``--tcp``, and the interfaces for NCCL and gloo (the torch backend's)."""
    config = horovod_settings.read_config(args.config_file) if args.config_file else {}
    controller = config.pop("controller", None) or "mpi"  # an empty line: the default
    if str(controller).lower() != "mpi" and not args.mpi:  # --mpi wins, as in horovodrun
        raise UsageError(f"--config-file {args.config_file!r}: controller {controller!r}: "
                         "hpctrain horovodrun starts MPI jobs only (controller: mpi)")
    env = horovod_settings.variables(horovod_settings.resolve(args, config))
    if args.tcp:
        env["NCCL_IB_DISABLE"] = "1"
    if nics := _interfaces(args):
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = nics
    return env


def _interfaces(args: argparse.Namespace) -> str:
    """``--network-interface`` values as one comma-separated list, in order, once each."""
    return ",".join(dict.fromkeys(n for flag in args.nics or () for n in flag.split(",") if n))


def mpirun_command(args: argparse.Namespace, environ: Mapping[str, str],
                   root: bool = False, flavour: str = "openmpi") -> list[str]:
    """The mpirun command line horovodrun's MPI mode would run for ``args`` on ``flavour``'s
    mpirun (one of :data:`FLAVOURS`), with ``environ`` as the launcher's environment."""
    hosts = check(args)
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r} not in {FLAVOURS}")
    if flavour == "openmpi":
        cmd = _open_mpi_command(args, hosts, environ, variables(args), root)
    else:
        cmd = _hydra_command(args, hosts, variables(args), intel=flavour == "intel")
    return [*cmd, *_words("--mpi-args", args.mpi_args), *args.program]


def _words(flag: str, text: str | None) -> list[str]:
    """``text`` split as a shell would; UsageError naming ``flag`` if it cannot be (an unclosed
    quote)."""
    try:
        return shlex.split(text or "")
    except ValueError as e:
        raise UsageError(f"{flag} {text!r}: {e}") from None


def _open_mpi_command(args: argparse.Namespace, hosts: list[tuple[str, int]],
                      environ: Mapping[str, str], changed: Mapping[str, str],
                      root: bool) -> list[str]:
    """Open MPI's mpirun: ``-H host:slots``, every variable exported with ``-x``."""
    _check_slots(args, hosts, environ)
    cmd = ["mpirun", "--allow-run-as-root"] if root else ["mpirun"]
    cmd += ["--tag-output", "-np", str(args.np),
            "-H", ",".join(f"{h}:{n}" for h, n in hosts),
            *(_words("--binding-args", args.binding_args) if args.binding_args
              else ["-bind-to", "none", "-map-by", "slot"])]
    if len(hosts) >= LARGE_CLUSTER:  # horovodrun's workaround for Open MPI's tree spawn
        cmd += ["-mca", "plm_rsh_no_tree_spawn", "true",
                "-mca", "plm_rsh_num_concurrent", str(len(hosts))]
    if args.prefix_output_with_timestamp:
        cmd += ["--timestamp-output"]
    if ssh := _ssh_args(args):
        cmd += ["-mca", "plm_rsh_args", ssh]
    if args.output_filename:
        cmd += ["--output-filename", args.output_filename]
    if nics := _interfaces(args):  # MPI's own TCP traffic
        cmd += ["-mca", "btl_tcp_if_include", nics]
    env = {**environ, **changed}
    for name in sorted(env):
        if _exported(name):
            cmd += ["-x", name if environ.get(name) == env[name] else f"{name}={env[name]}"]
    return cmd


def _exported(name: str) -> bool:
    """Whether ``-x`` names the variable: what horovodrun exports, less OMPI_ and PMIX_ ones
    (mpirun copies its own settings itself) and names no shell could set."""
    return (bool(_NAME.match(name)) and not name.startswith(("OMPI_", "PMIX_"))
            and not _NOT_EXPORTED.match(name))


def _hydra_command(args: argparse.Namespace, hosts: list[tuple[str, int]],
                   changed: Mapping[str, str], intel: bool) -> list[str]:
    """MPICH's or Intel MPI's mpirun (Hydra): ``-hosts``, ``-l`` for rank-tagged output; it
    passes its own environment to every rank, so only the variables set here are named."""
    which = "Intel MPI" if intel else "MPICH"
    if args.prefix_output_with_timestamp:
        raise UsageError(f"--prefix-output-with-timestamp: {which}'s mpirun cannot timestamp "
                         "output lines (only Open MPI's can); its lines carry the rank")
    # -l: each line tagged with its rank, unless the output goes to a file per rank.
    cmd = ["mpirun", *([] if args.output_filename else ["-l"]), "-np", str(args.np)]
    if intel:  # Intel MPI's -hosts takes names, its -ppn one count for all
        if len({n for _, n in hosts}) > 1:
            raise UsageError(f"hosts {','.join(f'{h}:{n}' for h, n in hosts)}: Intel MPI's "
                             "mpirun wants the same slots on every host; pass a machine file "
                             "in --mpi-args='-machinefile FILE' instead")
        cmd += ["-hosts", ",".join(h for h, _ in hosts), "-ppn", str(hosts[0][1])]
    else:
        cmd += ["-hosts", ",".join(f"{h}:{n}" for h, n in hosts)]
    if args.binding_args:
        cmd += _words("--binding-args", args.binding_args)
    elif not intel:  # Intel MPI pins through I_MPI_PIN* instead
        cmd += ["-bind-to", "none", "-map-by", "slot"]
    if ssh := _ssh_args(args):
        if not intel:
            raise UsageError(f"{ssh.split()[0]}: MPICH's mpirun takes no ssh arguments; set "
                             "Port and IdentityFile for the hosts in ~/.ssh/config")
        cmd += ["-bootstrap", "ssh", "-bootstrap-exec-args", ssh]
    if args.output_filename:  # only there, not on the terminal; Hydra makes no folders: run() does
        cmd += ["-outfile-pattern", f"{args.output_filename}/rank.%r.stdout",
                "-errfile-pattern", f"{args.output_filename}/rank.%r.stderr"]
    for name in sorted(changed):
        cmd += ["-genv", name, changed[name]]
    return cmd


def _ssh_args(args: argparse.Namespace) -> str:
    """``-p PORT -i KEY`` for ssh, from ``--ssh-port`` and ``--ssh-identity-file``."""
    return " ".join([*(["-p", str(args.ssh_port)] if args.ssh_port else []),
                     *(["-i", args.ssh_identity_file] if args.ssh_identity_file else [])])


def build_report() -> str:
    """horovodrun --check-build's table for hpctrain's backends (this imports torch).

    Controllers: how ranks are started and meet (MPI here; Gloo mode is refused). Tensor
    operations: what carries the collectives (MPI through mpi4py, NCCL and gloo through
    torch.distributed, on ``--sync-backend torch``), as ``hpctrain info`` reports them; MPI
    is not started here, so mpi4py and an mpirun on PATH stand for it."""
    import importlib.util

    from hpctrain import __version__, devices

    mpi = importlib.util.find_spec("mpi4py") is not None and shutil.which("mpirun") is not None
    facts = devices.describe()
    nccl, gloo = facts["nccl"], facts["gloo"]

    def box(value: bool) -> str:
        return "X" if value else " "
    return "\n".join([
        f"hpctrain {__version__} (horovod.torch's API as hpctrain.sync):", "",
        "Available Frameworks:", "    [ ] TensorFlow", "    [X] PyTorch", "    [ ] MXNet", "",
        "Available Controllers:", f"    [{box(mpi)}] MPI", "    [ ] Gloo", "",
        "Available Tensor Operations:", f"    [{box(nccl)}] NCCL", "    [ ] DDL", "    [ ] CCL",
        f"    [{box(mpi)}] MPI", f"    [{box(gloo)}] Gloo"])


def run(args: argparse.Namespace) -> None:
    """Check, then replace this process with mpirun (its exit status is the job's)."""
    if args.check_build:
        print(build_report(), flush=True)
        return
    mpirun = shutil.which("mpirun")
    kind = flavour_of(mpirun)
    # Built before the refusal below, so that the command line's and the config file's
    # mistakes are reported first.
    cmd = mpirun_command(args, os.environ, root=os.geteuid() == 0, flavour=kind or "openmpi")
    if kind is None or mpirun is None:
        raise UsageError("hpctrain horovodrun needs Open MPI's, MPICH's or Intel MPI's mpirun "
                         f"on PATH ({mpirun or 'none found'})")
    check_program(args)
    if args.output_filename:  # Open MPI's mpirun hangs on one it cannot make
        _make_output_folder(args.output_filename)
    if args.verbose:
        print(shlex.join(cmd), file=sys.stderr, flush=True)
    os.execv(passing_signals(mpirun), cmd)  # named mpirun still (argv[0]), as by the script


def check_program(args: argparse.Namespace) -> None:
    """Refuse a program that cannot be started, in one line, where every rank runs on this
    host (Open MPI's mpirun says so in 13 lines, exit 134). With other hosts named it is not
    checked: the program may exist only there."""
    words = args.program[1:] if args.program[:1] == ["--"] else args.program
    moved = set(_words("--mpi-args", args.mpi_args)) & set(_MOVES_PROGRAM)
    if not words or moved or not _all_here(check(args)):
        return
    program = words[0]
    if shutil.which(program) is not None:  # a bare name on PATH, or a path: an executable
        return
    if "/" not in program:
        raise UsageError(f"{program!r}: no such program on PATH (the command every rank runs)")
    why = "no such file" if not os.path.exists(program) else "not an executable file"
    raise UsageError(f"{program}: {why} (the command every rank runs)")


def _all_here(hosts: list[tuple[str, int]]) -> bool:
    """Whether every host is this machine, by the names mpirun starts it under without ssh."""
    name = socket.gethostname().lower()
    here = {"localhost", "127.0.0.1", "::1", name, name.split(".")[0]}
    return all(host.lower() in here for host, _ in hosts)


def main(argv: list[str]) -> None:
    """``hpctrain horovodrun ARGS``: parse, check, become mpirun; errors are one line, exit 2."""
    from hpctrain import job_end  # light: mpi4py's package, not MPI

    job_end.install_abort_on_error()
    parser = Parser(prog="hpctrain horovodrun", description=description())
    add_arguments(parser)
    run(parser.parse_args(argv))


def _make_output_folder(folder: str) -> None:
    """``--output-filename``'s folder, made here: Open MPI's mpirun printed its mkdir error
    for a file's path and then never exited; MPICH's takes a folder that exists."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-filename {folder}: cannot make that folder "
                         f"({e.strerror})") from None
