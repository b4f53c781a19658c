"""``--compile``: the model's forward through ``torch.compile`` (TorchInductor), as DDP users
and nanoGPT's ``train.py`` do it.

The loop compiles the model in place (``nn.Module.compile``) on each worker just before the
first step, so its parameters, state-dict keys, checkpoints and every algorithm's hooks stay
those of the plain model; backward runs through the compiled graph's autograd, so gradient
hooks (ssgd's buckets) still fire per parameter, but after the whole backward graph, not
interleaved with it. Evaluation and EC's teacher pass go through it too (in eval mode under
``no_grad``: one more graph). Each new input size compiles again once (then shapes are
dynamic): the first steps, the first evaluation and a short last batch take longer, and
EC's first round and its first step with relabelled samples (a batch of another size).
Each training batch size's first step also checks the compiled gradients against the plain
forward's (:func:`verify`): a rank whose compiled model computes them wrong (torch 2.13's
Inductor did, for LeNet on the CPU) trains uncompiled from there, and says so.

Compilation happens lazily, after MPI has started, so :func:`check` tries, before MPI, what
TorchInductor needs to be there: a torch that has ``nn.Module.compile`` (2.2), Dynamo for
this Python, Python's headers, and a C++ compiler (CPU) or Triton and a C compiler (CUDA).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

from hpctrain import options
from hpctrain.errors import UsageError
from hpctrain.metrics import say

# The simulator's workers are threads. With torch 2.11 (2.13 is fine) Dynamo crashed with a
# segmentation fault when one of them traced a graph again for a new input size after another
# thread had traced the first: refused there rather than crashing.
THREADS_NEED = "2.13"


def check(on: bool, device_type: str, in_threads: bool = False) -> None:
    """UsageError (before MPI) when ``--compile`` cannot work on ``device_type`` here;
    ``in_threads``: for the simulator, whose workers are threads."""
    why = problem(device_type, in_threads) if on else None
    if why:
        raise UsageError(f"{options.named('--compile', 'RunConfig', 'compile', True)} {why}")


def problem(device_type: str, in_threads: bool = False) -> str | None:
    """What torch.compile lacks here on ``device_type`` (``hpctrain info`` says it), or None."""
    if not hasattr(torch.nn.Module, "compile"):
        return f"needs torch >= 2.2 (nn.Module.compile), not {torch.__version__}"
    if in_threads and torch.torch_version.TorchVersion(torch.__version__) < THREADS_NEED:
        return (f"in the simulator needs torch >= {THREADS_NEED}: with torch 2.11 Dynamo "
                "crashed (a segmentation fault) when a simulated worker, a thread, compiled "
                f"the model again for a new input size; torch {torch.__version__} here. "
                "hpctrain train --compile works")
    supported = getattr(torch._dynamo, "is_dynamo_supported", lambda: True)
    if not supported():
        return (f"cannot run on this Python: torch {torch.__version__}'s "
                "torch._dynamo.is_dynamo_supported() is false")
    defaults: tuple[str, ...]
    if device_type == "cuda":
        if not _has_triton():
            return (f"on a GPU needs Triton (pip install triton, the version torch "
                    f"{torch.__version__} was built with)")
        # Triton builds its CUDA driver's Python module with a C compiler on first use.
        where, compiler = "on a GPU", "C compiler (CC, else gcc or clang on PATH; Triton "
        compiler += "builds its CUDA driver with it)"
        variable, defaults = "CC", ("gcc", "clang")
    else:  # TorchInductor's cpp.cxx: CXX, else one name (no other is tried)
        default = "clang++" if sys.platform == "darwin" else "g++"
        where, compiler = "on the CPU", f"C++ compiler (CXX, else {default} on PATH)"
        variable, defaults = "CXX", (default,)
    given = os.environ.get(variable)
    if given and not shutil.which(given):  # the one tried, failing at the first step
        return f"{where} needs a {compiler}; {variable}={given!r} was not found"
    if not given and not any(shutil.which(c) for c in defaults):
        return f"{where} needs a {compiler}; none was found"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return (f"{where} needs Python's headers ({headers} is missing: install python3-dev "
                "or your Python's development package)")
    return None


def apply(on: bool, model: torch.nn.Module) -> None:
    """Compile ``model``'s forward in place when ``on`` (the first call compiles)."""
    if on:
        model.compile()


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` compiled ``model`` (``nn.Module.compile``)."""
    return getattr(model, "_compiled_call_impl", None) is not None


def first_call(model: torch.nn.Module, *shape: object) -> bool:
    """Whether ``model`` is compiled and has not run on inputs of ``shape`` (a key such as
    ("train", 64)): the call compiles, which a stall check must allow for. The shapes seen
    are kept on the model (a copy starts from its original's)."""
    if not is_compiled(model):
        return False
    seen = model.__dict__.setdefault("_hpctrain_shapes_run", set())
    if shape in seen:
        return False
    seen.add(shape)
    return True


def met_new_shapes(model: torch.nn.Module, since: str) -> bool:
    """Whether :func:`first_call` met a new shape on ``model`` since the last call naming
    ``since`` (the first call: since the start): another rank may still be compiling it, and
    one waiting for that rank in a collective must allow for it too."""
    seen = len(model.__dict__.get("_hpctrain_shapes_run", ()))
    marks = model.__dict__.setdefault("_hpctrain_shapes_marks", {})
    new, marks[since] = seen != marks.get(since, 0), seen
    return new


def announce() -> None:
    """Tell the user why the first steps are slow (before the progress bar draws)."""
    print("hpctrain: --compile: the first steps compile the model (torch.compile); they take "
          "longer", flush=True)


# Relative difference (gradients' norm) up to which compiled gradients pass as the plain
# ones: torch 2.13's wrong LeNet ones were 0.39-0.48 off, which trains to nothing; float32's
# own rounding reaches 4e-3 in ResNet-20 at its start (3x32x32 inputs, against float64's),
# and its compiled convolutions differ by as much (3.5e-3 at 1x16x16, batch 128), harmless.
TOLERANCE = 1e-2
# Above it, the compiled gradients are wrong when farther from float64's than MARGIN times
# the plain ones (a deep or ill-conditioned model's float32 is itself far off).
MARGIN = 10


def verify(model: torch.nn.Module, x: torch.Tensor, rank: int = 0) -> bool:
    """Whether ``model``'s compiled gradients on the input batch ``x`` (a size it has not run)
    are right; if not, ``model`` trains uncompiled from here, said on stderr. torch 2.13's
    TorchInductor computed LeNet's convolution gradients on the CPU 0.39-0.48 off at some
    batch sizes (16x16 inputs: 8 and 32), with no error.

    Right: within :data:`TOLERANCE` of the plain forward's, or else no more than
    :data:`MARGIN` times as far from the float64 gradients (the plain forward on a float64
    copy of the parameters and buffers) as the plain float32 ones are, so that a model's own
    float32 rounding is not taken for the compiler's error. A model that cannot run in
    float64 is held to its plain gradients alone.

    Leaves no trace: the random generators and the buffers (batch norm's statistics) are
    put back, and ``torch.autograd.grad`` fills no ``.grad`` and fires no accumulation hook
    (ssgd's buckets). A model whose forward draws random numbers (dropout), which Inductor
    draws otherwise, cannot be compared and is left compiled, as one whose output is no
    float tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not is_compiled(model) or not params or _autocast(x.device.type):
        return True  # under autocast, its rounding is no compiler's error
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = [x.device] if x.device.type == "cuda" else []
    state = _rng_state(devices)

    def gradients(forward, seed: int | None = None) -> list[torch.Tensor] | None:
        """``forward``'s gradients on ``x`` from the buffers and generators the step found,
        which each call puts back."""
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return _gradients(forward, x, params)
        finally:
            _restore(model, buffers, devices, state)

    eager = gradients(model.forward)  # forward: the plain module, not the compiled call
    compiled = gradients(model)
    if eager is None or compiled is None:
        return True
    off = _relative(eager, compiled)
    if off <= TOLERANCE:
        return True
    again = gradients(model.forward, seed=torch.initial_seed() + 1)  # is the forward random?
    if again is None or _relative(eager, again) > TOLERANCE:
        return True  # dropout: compiled draws differ from eager ones, nothing to compare
    try:
        truth = _float64_gradients(model, x)
    finally:
        _restore(model, buffers, devices, state)
    if truth is not None:
        plain, off = _relative(truth, eager), _relative(truth, compiled)
        if off <= max(TOLERANCE, MARGIN * plain):
            return True
        said = f"float64's by {off:.2g} (relative), its uncompiled ones' by {plain:.2g}"
    else:
        said = f"its uncompiled ones by {off:.2g} (relative; allowed: {TOLERANCE:g})"
    model._compiled_call_impl = None  # nn.Module.compile's: the plain forward from here
    say(f"hpctrain: rank {rank}: --compile: the compiled model's gradients for a batch of "
        f"{len(x)} differ from {said}: TorchInductor computed them wrong, so this rank "
        "trains uncompiled from here")
    return False


def _gradients(forward, x: torch.Tensor, params: list) -> list[torch.Tensor] | None:
    """The gradients of a fixed random projection of ``forward(x)`` (no labels needed, every
    output counts; drawn in float32 whatever the output's type, so that float64's is the same
    projection); None for an output that is no float tensor."""
    out = forward(x)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return None
    weights = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(0),
                          device=out.device, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _float64_gradients(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    """:func:`_gradients` of ``model``'s plain forward on float64 copies of ``x`` (if float)
    and of its parameters and buffers (its own untouched); None where the model cannot run
    in float64 (a forward that makes float32 tensors of its own) or the copy does not fit in
    memory."""
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    impl, model._compiled_call_impl = model._compiled_call_impl, None  # the plain call
    try:
        wide = {n: t.detach().double() if t.is_floating_point() else t.detach().clone()
                for n, t in [*model.named_parameters(), *model.named_buffers()]}
        params = [wide[n].requires_grad_() for n in trained]
        return _gradients(lambda v: torch.func.functional_call(model, wide, (v,)),
                          x.double() if x.is_floating_point() else x, params)
    except Exception:  # noqa: BLE001 - no reference to be had; the plain gradients serve
        return None
    finally:
        model._compiled_call_impl = impl


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4: no device argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return (torch.is_autocast_cpu_enabled() if device_type == "cpu"
                else torch.is_autocast_enabled())


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """How far ``b`` is from ``a``: the norm of their difference over ``a``'s, all tensors
    together, in float64."""
    wide = torch.float64
    diff = sum(float((u.to(wide) - v.to(wide)).pow(2).sum()) for u, v in zip(a, b, strict=True))
    norm = sum(float(u.to(wide).pow(2).sum()) for u in a)
    return (diff / norm) ** 0.5 if norm else diff ** 0.5


def _rng_state(devices: list) -> tuple:
    """The CPU's random generator state and each of ``devices``' (GPUs)."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _restore(model: torch.nn.Module, buffers: dict, devices: list, state: tuple) -> None:
    """The buffers and random generators as they were before the first forward."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()
