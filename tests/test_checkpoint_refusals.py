"""The checkpoint policy's refusals, word for word: by the flags typed on the command line
(``--checkpoint-dir DIR``), by the fields given from Python (``CheckpointConfig.dir='DIR'``).
One table of every refusal :func:`hpctrain.checkpoint.check` makes, in both forms, so that a
change of how they are put together (:func:`hpctrain.options.keyed`) keeps each one's words.
ROOT stands for the test's folder."""

from pathlib import Path

import pytest

from hpctrain import checkpoint, options
from hpctrain import config as configs
from hpctrain.errors import UsageError

NAMES = configs.flat_fields(configs.RunConfig(algo="ma"))  # ma: tau, an algorithm's option


# Each case's refusal (cli: within options.command_line(), python: outside it).
EXPECTED = {
    'cli:dir_needs_every': (
        '--checkpoint-dir ROOT/x needs --checkpoint-every: without it no checkpoint is '
        'written'
    ),
    'cli:auto_needs_out': (
        '--resume auto needs --out or --checkpoint-dir: the folder a restarted job looks in '
        'for its checkpoints'
    ),
    'cli:auto_aside': (
        '--resume auto: ROOT/aside/checkpoints holds only unusable checkpoints '
        '(ckpt-000000007.pt.corrupt): resume from a good copy, or choose another folder '
        'for a new run'
    ),
    'cli:out_unfinished': (
        '--out ROOT/run holds the checkpoints of an unfinished run; continue it with --resume'
        ' ROOT/run or choose another folder'
    ),
    'cli:out_unreadable': (
        '--out ROOT/unreadable holds the checkpoints of an unfinished run, none of which can '
        'be read (ckpt-000000007.pt: unreadable header): to go on, put back a good copy of '
        'one; to start anew, choose another --out, or first move them out of the folder'
    ),
    'cli:out_aside': (
        "--out ROOT/aside holds an unfinished run's checkpoints, only unusable ones "
        '(ckpt-000000007.pt.corrupt): resume from a good copy, or choose another folder '
        'for a new run'
    ),
    'cli:out_is_ck': (
        "--out ROOT/ck is a folder of checkpoints (a run's --checkpoint-dir); continue that "
        'run with --resume ROOT/ck or choose another folder'
    ),
    'cli:dir_held': (
        "--checkpoint-dir ROOT/ck holds another run's checkpoints; resume it with --resume or"
        ' choose another folder'
    ),
    'cli:dir_held_slash': (  # as typed, not as a Path writes it
        "--checkpoint-dir ROOT/ck/ holds another run's checkpoints; resume it with --resume or"
        ' choose another folder'
    ),
    'cli:dir_unreadable': (
        "--checkpoint-dir ROOT/ckbad holds another run's checkpoints, none of which can be "
        'read (ckpt-000000007.pt: unreadable header): to go on, put back a good copy of one; '
        'to start anew, choose another --checkpoint-dir, or first move them out of the folder'
    ),
    'cli:dir_aside': (
        "--checkpoint-dir ROOT/ckaside holds another run's checkpoints, only unusable ones "
        '(ckpt-000000007.pt.corrupt): resume from a good copy, or choose another folder'
    ),
    'cli:dir_held_resume': (
        "--checkpoint-dir ROOT/ck holds another run's checkpoints; resume it with --resume or"
        ' choose another folder'
    ),
    'cli:dir_other_out': (
        "--checkpoint-dir ROOT/other is another run's --out folder; choose another folder"
    ),
    'cli:dir_compare': (
        '--checkpoint-dir ROOT/cmp holds a bench compare; choose another folder'
    ),
    'cli:resume_file': (
        '--resume ROOT/ck/ckpt-000000005.pt: is a file; give the folder that holds it '
        '(ROOT/ck): --resume takes its newest valid checkpoint'
    ),
    'cli:resume_gone': (
        '--resume ROOT/gone: no such folder'
    ),
    'cli:resume_algo': (
        '--resume ROOT/ck: its checkpoint is of --algo sgd, not --algo ssgd'
    ),
    'cli:resume_auto_algo': (
        '--resume auto (ROOT/ck): its checkpoint is of --algo sgd, not --algo ssgd'
    ),
    'cli:resume_ranks': (
        '--resume ROOT/ck: its checkpoint is of 2 ranks, not 3, and this run cannot be '
        'resized'
    ),
    'cli:resume_both': (
        '--resume ROOT/ck: its checkpoint is of --algo sgd on 2 ranks, not --algo ma on 3, '
        'and this run cannot be resized'
    ),
    'cli:resume_unknown': (
        '--resume ROOT/n: its checkpoint records --new-thing 5, an option this hpctrain does '
        'not know (a newer hpctrain wrote it); whether the run can go on without it cannot be'
        ' told: go on with the hpctrain that wrote the checkpoint'
    ),
    'cli:resume_unreadable': (
        '--resume ROOT/ckbad: none of the checkpoints there can be read (ckpt-000000007.pt: '
        'unreadable header): to go on, put back a good copy of one; to start anew, choose '
        'another --out, or first move them out of the folder'
    ),
    'cli:resume_aside': (
        '--resume ROOT/ckaside: ROOT/ckaside holds only unusable checkpoints '
        '(ckpt-000000007.pt.corrupt): resume from a good copy'
    ),
    'cli:resume_empty': (
        '--resume ROOT/empty: no checkpoint found there'
    ),
    'cli:resume_changed': (
        '--resume ROOT/old: the run was started with --epochs 2, not 4 (the default); with '
        '--init-from w.pt, not v.pt; with --model-args \'{"depth": 2}\', not \'{"depth": 3}\'; '
        "with --tau 3, not without it: to go on, give --epochs 2; --init-from takes the run's"
        ' path, or a file of its weights (sha256 abababababab...)'
    ),
    'cli:resume_bools': (
        '--resume ROOT/b/: the run was started without --clip-grad-norm (its default; leave '
        'it out), not with --clip-grad-norm 1.0; with --epochs 2, not 3; with --init-from '
        'w.pt, not v.pt; with --nesterov, not without it; with --no-progress, not without it;'
        ' with --tau 0.5, not without it: to go on, give --nesterov --no-progress; --epochs '
        'shapes the learning-rate schedule, so a run keeps its length: to train longer, start'
        " a new run, with --init-from a finished run's model"
    ),
    'cli:out_slash': (
        '--out ROOT/run/ holds the checkpoints of an unfinished run; continue it with '
        '--resume ROOT/run/ or choose another folder'
    ),
    'cli:resume_left_out': (
        '--resume ROOT/old: the run was started with --lr 0.1, not 0.3 (the default): to go '
        'on, give --lr 0.1'
    ),
    'python:dir_needs_every': (
        "CheckpointConfig.dir='ROOT/x' needs CheckpointConfig.every: without it no checkpoint"
        ' is written'
    ),
    'python:auto_needs_out': (
        "CheckpointConfig.resume='auto' needs RunConfig.out or CheckpointConfig.dir: the "
        'folder a restarted job looks in for its checkpoints'
    ),
    'python:auto_aside': (
        "CheckpointConfig.resume='auto': ROOT/aside/checkpoints holds only unusable "
        'checkpoints (ckpt-000000007.pt.corrupt): resume from a good copy, or choose '
        'another folder for a new run'
    ),
    'python:out_unfinished': (
        "RunConfig.out='ROOT/run' holds the checkpoints of an unfinished run; continue it "
        "with CheckpointConfig.resume='ROOT/run' or choose another folder"
    ),
    'python:out_unreadable': (
        "RunConfig.out='ROOT/unreadable' holds the checkpoints of an unfinished run, none of "
        'which can be read (ckpt-000000007.pt: unreadable header): to go on, put back a good '
        'copy of one; to start anew, choose another RunConfig.out, or first move them out of '
        'the folder'
    ),
    'python:out_aside': (
        "RunConfig.out='ROOT/aside' holds an unfinished run's checkpoints, only unusable ones"
        ' (ckpt-000000007.pt.corrupt): resume from a good copy, or choose another folder'
        ' for a new run'
    ),
    'python:out_is_ck': (
        "RunConfig.out='ROOT/ck' is a folder of checkpoints (a run's CheckpointConfig.dir); "
        "continue that run with CheckpointConfig.resume='ROOT/ck' or choose another folder"
    ),
    'python:dir_held': (
        "CheckpointConfig.dir='ROOT/ck' holds another run's checkpoints; resume it with "
        'CheckpointConfig.resume or choose another folder'
    ),
    'python:dir_held_slash': (  # the value given: no other
        "CheckpointConfig.dir='ROOT/ck/' holds another run's checkpoints; resume it with "
        'CheckpointConfig.resume or choose another folder'
    ),
    'python:dir_unreadable': (
        "CheckpointConfig.dir='ROOT/ckbad' holds another run's checkpoints, none of which can"
        ' be read (ckpt-000000007.pt: unreadable header): to go on, put back a good copy of '
        'one; to start anew, choose another CheckpointConfig.dir, or first move them out of '
        'the folder'
    ),
    'python:dir_aside': (
        "CheckpointConfig.dir='ROOT/ckaside' holds another run's checkpoints, only unusable "
        'ones (ckpt-000000007.pt.corrupt): resume from a good copy, or choose another '
        'folder'
    ),
    'python:dir_held_resume': (
        "CheckpointConfig.dir='ROOT/ck' holds another run's checkpoints; resume it with "
        'CheckpointConfig.resume or choose another folder'
    ),
    'python:dir_other_out': (
        "CheckpointConfig.dir='ROOT/other' is another run's RunConfig.out folder; choose "
        'another folder'
    ),
    'python:dir_compare': (
        "CheckpointConfig.dir='ROOT/cmp' holds a bench compare; choose another folder"
    ),
    'python:resume_file': (
        "CheckpointConfig.resume='ROOT/ck/ckpt-000000005.pt': is a file; give the folder that"
        ' holds it (ROOT/ck): CheckpointConfig.resume takes its newest valid checkpoint'
    ),
    'python:resume_gone': (
        "CheckpointConfig.resume='ROOT/gone': no such folder"
    ),
    'python:resume_algo': (
        "CheckpointConfig.resume='ROOT/ck': its checkpoint is of RunConfig.algo='sgd', not "
        "RunConfig.algo='ssgd'"
    ),
    'python:resume_auto_algo': (
        "CheckpointConfig.resume='auto' (ROOT/ck): its checkpoint is of RunConfig.algo='sgd',"
        " not RunConfig.algo='ssgd'"
    ),
    'python:resume_ranks': (
        "CheckpointConfig.resume='ROOT/ck': its checkpoint is of 2 ranks, not 3, and this run"
        ' cannot be resized'
    ),
    'python:resume_both': (
        "CheckpointConfig.resume='ROOT/ck': its checkpoint is of RunConfig.algo='sgd' on 2 "
        "ranks, not RunConfig.algo='ma' on 3, and this run cannot be resized"
    ),
    'python:resume_unknown': (
        "CheckpointConfig.resume='ROOT/n': its checkpoint records --new-thing 5, an option "
        'this hpctrain does not know (a newer hpctrain wrote it); whether the run can go on '
        'without it cannot be told: go on with the hpctrain that wrote the checkpoint'
    ),
    'python:resume_unreadable': (
        "CheckpointConfig.resume='ROOT/ckbad': none of the checkpoints there can be read "
        '(ckpt-000000007.pt: unreadable header): to go on, put back a good copy of one; to '
        'start anew, choose another RunConfig.out, or first move them out of the folder'
    ),
    'python:resume_aside': (
        "CheckpointConfig.resume='ROOT/ckaside': ROOT/ckaside holds only unusable checkpoints"
        ' (ckpt-000000007.pt.corrupt): resume from a good copy'
    ),
    'python:resume_empty': (
        "CheckpointConfig.resume='ROOT/empty': no checkpoint found there"
    ),
    'python:resume_changed': (
        "CheckpointConfig.resume='ROOT/old': the run was started with OptimConfig.epochs=2, "
        "not 4 (the default); with ModelConfig.init_from='w.pt', not 'v.pt'; with "
        "ModelConfig.args={'depth': 2}, not {'depth': 3}; with AveragingOptions.tau=3, not "
        'without it: to go on, give OptimConfig.epochs=2; ModelConfig.init_from takes the '
        "run's path, or a file of its weights (sha256 abababababab...)"
    ),
    'python:resume_bools': (
        "CheckpointConfig.resume='ROOT/b/': the run was started without "
        'OptimConfig.clip_grad_norm (its default; leave it out), not with '
        'OptimConfig.clip_grad_norm=1.0; with OptimConfig.epochs=2, not 3; with '
        "ModelConfig.init_from='w.pt', not 'v.pt'; with OptimConfig.nesterov=True, not False "
        '(the default); with RunConfig.progress=False, not True (the default); with '
        'AveragingOptions.tau=0.5, not without it: to go on, give OptimConfig.nesterov=True '
        'RunConfig.progress=False; OptimConfig.epochs shapes the learning-rate schedule, so a'
        ' run keeps its length: to train longer, start a new run, with ModelConfig.init_from '
        "a finished run's model"
    ),
    'python:out_slash': (
        "RunConfig.out='ROOT/run/' holds the checkpoints of an unfinished run; continue it "
        "with CheckpointConfig.resume='ROOT/run/' or choose another folder"
    ),
    'python:resume_left_out': (
        "CheckpointConfig.resume='ROOT/old': the run was started with OptimConfig.lr=0.1, not"
        ' 0.3 (the default): to go on, give OptimConfig.lr=0.1'
    ),
}


def a_run(folder, algo="sgd", ranks=2, sha=None, **args) -> None:
    """A run's checkpoint in ``folder``, as a Checkpointer writes its header."""
    header = {"algo": algo, "ranks": ranks, "workers": ranks,
              "args": {"lr": 0.1, "batch_size": 64, **args}}
    if sha:
        header["init_from_sha256"] = sha
    checkpoint.save(folder, 5, {"x": 1}, header)


def broken(folder, name="ckpt-000000007.pt") -> None:
    """A checkpoint that cannot be read (or, named ``*.corrupt``, one set aside)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / name).write_bytes(b"not a checkpoint\n")


def scenarios(root: Path) -> dict[str, dict]:
    """The folders each refusal needs, made in ``root``; each case's arguments to check."""
    def r(name: str) -> Path:
        return root / name

    a_run(r("run") / "checkpoints")
    broken(r("unreadable") / "checkpoints")
    broken(r("aside") / "checkpoints", "ckpt-000000007.pt.corrupt")
    a_run(r("ck"))
    broken(r("ckbad"))
    broken(r("ckaside"), "ckpt-000000007.pt.corrupt")
    for name, file in (("other", "config.json"), ("cmp", "compare.json")):
        r(name).mkdir()
        (r(name) / file).write_text("{}")
    r("empty").mkdir()
    a_run(r("old"), epochs=2, init_from="w.pt", sha="ab" * 32, no_progress=True,
          model_args={"depth": 2}, eval_rank=None, tau=3, newer=1)
    a_run(r("n"), lr=0.1, new_thing=5)
    a_run(r("b"), epochs=2, no_progress=True, nesterov=True, clip_grad_norm=None, tau=0.5,
          init_from="w.pt")
    base = {"lr": 0.1, "batch_size": 64}
    new = {**base, "epochs": 4, "init_from": "v.pt", "no_progress": False,
           "model_args": {"depth": 3}, "eval_rank": 1, "tau": None, "newer": 1}
    return {
        "dir_needs_every": dict(checkpoint_dir=str(r("x"))),
        "auto_needs_out": dict(resume="auto"),
        "auto_aside": dict(resume="auto", out=str(r("aside"))),
        "out_unfinished": dict(out=str(r("run"))),
        "out_unreadable": dict(out=str(r("unreadable"))),
        "out_aside": dict(out=str(r("aside"))),
        "out_is_ck": dict(out=str(r("ck"))),
        "dir_held": dict(checkpoint_dir=str(r("ck")), every="1e"),
        "dir_held_slash": dict(checkpoint_dir=str(r("ck")) + "/", every="1e"),
        "dir_unreadable": dict(checkpoint_dir=str(r("ckbad")), every="1e"),
        "dir_aside": dict(checkpoint_dir=str(r("ckaside")), every="1e"),
        "dir_held_resume": dict(checkpoint_dir=str(r("ck")), resume=str(r("run") / "checkpoints"),
                                every="1e", run_config=base),
        "dir_other_out": dict(checkpoint_dir=str(r("other")), every="1e"),
        "dir_compare": dict(checkpoint_dir=str(r("cmp")), every="1e"),
        "resume_file": dict(resume=str(checkpoint.listing(r("ck"))[0])),
        "resume_gone": dict(resume=str(r("gone"))),
        "resume_algo": dict(resume=str(r("ck")), algo="ssgd"),
        "resume_auto_algo": dict(resume="auto", checkpoint_dir=str(r("ck")), algo="ssgd"),
        "resume_ranks": dict(resume=str(r("ck")), ranks=3),
        "resume_both": dict(resume=str(r("ck")), ranks=3, algo="ma"),
        "resume_unknown": dict(resume=str(r("n")), absent={"lr": 0.1, "batch_size": 64}),
        "resume_unreadable": dict(resume=str(r("ckbad"))),
        "resume_aside": dict(resume=str(r("ckaside"))),
        "resume_empty": dict(resume=str(r("empty"))),
        "resume_changed": dict(resume=str(r("old")), run_config=new,
                               defaults={"epochs": 4, "no_progress": False}),
        "resume_bools": dict(resume=str(r("b")) + "/", may_change=frozenset(),
                             run_config={**base, "epochs": 3, "no_progress": False,
                                         "nesterov": False, "clip_grad_norm": 1.0,
                                         "tau": None, "init_from": "v.pt"},
                             defaults={"no_progress": False, "nesterov": False}),
        "out_slash": dict(out=str(r("run")) + "/"),
        "resume_left_out": dict(resume=str(r("old")),
                                run_config={**new, "epochs": 2, "init_from": "w.pt",
                                            "no_progress": True, "model_args": {"depth": 2},
                                            "eval_rank": None, "tau": 3, "lr": 0.3},
                                defaults={"lr": 0.3}),
    }



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    return root, scenarios(root)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_refusal_word_for_word(folders, case):
    root, given = folders
    mode, name = case.split(":")
    values = {"algo": "sgd", "ranks": 2, "every": None, "checkpoint_dir": None,
              "resume": None, "out": None, "run_config": {"lr": 0.1, "batch_size": 64},
              "may_change": checkpoint.MAY_CHANGE, "names": NAMES, **given[name]}
    with pytest.raises(UsageError) as e:
        if mode == "cli":
            with options.command_line():  # as `hpctrain train` checks it
                checkpoint.check(**values)
        else:
            checkpoint.check(**values)
    assert str(e.value).replace(str(root), "ROOT") == EXPECTED[case]


def test_without_names_python_is_told_the_flags(folders):
    """``names`` None (a caller that knows no fields): the flags, from Python too."""
    root, given = folders
    with pytest.raises(UsageError) as e:
        checkpoint.check(algo="sgd", ranks=2, every=None, resume=None, out=None, run_config={},
                         may_change=checkpoint.MAY_CHANGE, **given["dir_needs_every"])
    assert str(e.value).replace(str(root), "ROOT") == EXPECTED["cli:dir_needs_every"]


def test_a_folder_of_no_usable_checkpoint_at_the_resume_names_the_field_from_python(tmp_path):
    """checkpoint.newest (rank 0's read at the resume, after the checks before launch) said
    ``--resume DIR: no usable checkpoint`` to a caller of hpctrain.train, who typed no flag:
    the field given from Python, the flag on the command line."""
    broken(tmp_path)
    said = ": no usable checkpoint (each one's problem is said above; they are kept as *.corrupt)"
    with pytest.raises(UsageError) as e, options.command_line():
        checkpoint.newest(tmp_path)
    assert str(e.value) == f"--resume {tmp_path}{said}"
    broken(tmp_path)  # set aside as *.corrupt by the first read
    with pytest.raises(UsageError) as e:
        checkpoint.newest(tmp_path)
    assert str(e.value) == f"CheckpointConfig.resume={str(tmp_path)!r}{said}"


def test_a_refusal_counts_the_checkpoints_set_aside():
    """One checkpoint set aside read "(ckpt-000000007.pt.corrupt, ...)", as if there were
    more; several are named by the first and a count."""
    aside = [Path(f"ckpt-00000000{n}.pt.corrupt") for n in (5, 6, 7)]
    assert checkpoint.named_aside(aside[:1]) == "ckpt-000000005.pt.corrupt"
    assert checkpoint.named_aside(aside) == "ckpt-000000005.pt.corrupt and 2 more"
