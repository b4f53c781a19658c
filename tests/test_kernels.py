"""The fused compensation kernels against the plain-torch formula, and their guards."""

import ctypes
import importlib.machinery
import shutil
import subprocess

import pytest
import torch
from conftest import gpu_missing

from hpctrain import cli, devices, kernels
from hpctrain.errors import UsageError

ROOT = kernels._HERE.parent
SIZES = [1, 7, 1000003]
HYPER = {"lr": 0.1, "lam": 0.04, "ms_decay": 0.95, "weight_decay": 1e-3, "momentum": 0.9}
FLT_MAX = torch.finfo(torch.float32).max
VARIANTS = {"dcasgd-c": (False, False), "dcasgd-a": (True, False),
            "dcasgd-c+momentum": (False, True), "dcasgd-a+momentum": (True, True)}


def reference(w, g, w_bak, ms, v=None, *, lr, lam, ms_decay, weight_decay, momentum):
    """DESIGN.md's formula in plain torch (plus momentum): (new w, step d, new ms, new v)."""
    gd = g + weight_decay * w_bak
    new_ms = None
    if ms is not None:
        # g'^2 first, and the stored ms clamped, as the kernel does: g'^2 overflows above 1.8e19
        s = ms_decay * ms + (1 - ms_decay) * (gd * gd)
        new_ms = s.clamp(max=FLT_MAX)
        lam = lam / torch.sqrt(s + 1e-7)
    d = -lr * (gd + lam * gd * gd * (w - w_bak))
    if v is not None:
        d = momentum * v + d
    return w + d, d, new_ms, (d if v is not None else None)


def inputs(n, seed=0, adaptive=False, momentum=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    w_bak = w + 0.1 * torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    ms = torch.rand(n, generator=gen) if adaptive else None
    v = 0.1 * torch.randn(n, generator=gen) if momentum else None
    return w, g, w_bak, ms, v


def copy(t):
    return None if t is None else t.clone()


def close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_matches_reference(n, variant):
    w, g, w_bak, ms, v = inputs(n, 0, *VARIANTS[variant])
    want_w, _, want_ms, want_v = reference(w, g, w_bak, ms, v, **HYPER)
    ms_k, v_k = copy(ms), copy(v)
    out = kernels.dc_update(w.clone(), g, w_bak, ms_k, v_k, **HYPER)
    close(out, want_w)
    if ms is not None:
        close(ms_k, want_ms)
    if v is not None:
        close(v_k, want_v)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_matches_reference_and_update(n, variant):
    w, g, w_bak, ms, v = inputs(n, 1, *VARIANTS[variant])
    want_w, want_d, want_ms, want_v = reference(w, g, w_bak, ms, v, **HYPER)
    ms_k, v_k = copy(ms), copy(v)
    w_new = torch.empty_like(w)
    d = kernels.dc_delta(w, g, w_bak, ms_k, v_k, **HYPER, w_out=w_new)
    close(d, want_d)
    close(w_new, want_w)
    if ms is not None:
        close(ms_k, want_ms)
    if v is not None:
        assert torch.equal(v_k, d)
    # Both entry points share the math: w + d is bit-for-bit the applied update.
    assert torch.equal(kernels.dc_update(w.clone(), g, w_bak, copy(ms), copy(v), **HYPER),
                       w_new)
    assert torch.equal(kernels.dc_delta(w, g, w_bak, copy(ms), copy(v), **HYPER), d)


def test_asgd_is_plain_sgd_and_no_compensation_when_model_is_current():
    w, g, w_bak, _, _ = inputs(1000)
    asgd = kernels.dc_update(w.clone(), g, w_bak, lr=0.1)
    close(asgd, w - 0.1 * g)
    # w == w_bak: the compensation term vanishes exactly, for both variants.
    plain = kernels.dc_update(w.clone(), g, w, lr=0.1)
    assert torch.equal(kernels.dc_update(w.clone(), g, w, lr=0.1, lam=5.0), plain)
    assert torch.equal(kernels.dc_update(w.clone(), g, w, torch.rand(1000), lr=0.1, lam=5.0),
                       plain)


def test_threads_give_identical_results():
    w, g, w_bak, ms, v = inputs(300001, adaptive=True, momentum=True)
    one = kernels.dc_update(w.clone(), g, w_bak, ms.clone(), v.clone(), **HYPER, threads=1)
    two = kernels.dc_update(w.clone(), g, w_bak, ms.clone(), v.clone(), **HYPER, threads=2)
    assert torch.equal(one, two)


def test_in_place_and_aliased_outputs():
    n = 1000003
    w, g, w_bak, ms, _ = inputs(n, seed=2, adaptive=True)
    want_w, want_d, want_ms, _ = reference(w, g, w_bak, ms, **HYPER)
    # Default: w itself is updated, through any view of it.
    w1, ms1 = w.clone(), ms.clone()
    view = w1.view(1000003, 1)
    ptr = w1.data_ptr()
    assert kernels.dc_update(w1, g, w_bak, ms1, **HYPER) is w1
    assert w1.data_ptr() == ptr
    close(w1, want_w)
    close(view.view(-1), want_w)
    close(ms1, want_ms)
    # The optimizer's use: the new model written over w_bak, the step written over g.
    b2, g2 = w_bak.clone(), g.clone()
    kernels.dc_update(w, g, b2, ms.clone(), **HYPER, out=b2)
    close(b2, want_w)
    # The shared-memory store's use: new model into the shard (w, in place) and over w_bak.
    w4, b4 = w.clone(), w_bak.clone()
    kernels.dc_update(w4, g, b4, ms.clone(), **HYPER, out2=b4)
    close(w4, want_w)
    assert torch.equal(w4, b4)
    b3 = w_bak.clone()
    kernels.dc_delta(w, g2, b3, ms.clone(), **HYPER, out=g2, w_out=b3)
    close(g2, want_d)
    close(b3, want_w)


def test_slices_of_a_flat_buffer_at_odd_offsets():
    w, g, w_bak, ms, v = inputs(1003, seed=3, adaptive=True, momentum=True)
    flat = torch.zeros(2000)
    part = flat[3:1006]
    part.copy_(w)
    want_w, _, _, _ = reference(w, g, w_bak, ms, v, **HYPER)
    kernels.dc_update(part, g, w_bak, ms.clone(), v.clone(), **HYPER)
    close(part, want_w)
    assert flat[:3].eq(0).all() and flat[1006:].eq(0).all()


def test_zero_elements():
    """Every empty tensor's data_ptr is 0: the overlap check took two of them for one."""
    e = torch.empty(0)
    assert kernels.dc_update(e, e.clone(), e.clone(), lr=0.1).numel() == 0
    assert kernels.dc_update(e, e, e, ms=torch.empty(0), v=torch.empty(0), lr=0.1,
                             lam=0.04, momentum=0.9).numel() == 0
    assert kernels.dc_delta(e, e, e, ms=torch.empty(0), v=torch.empty(0), lr=0.1,
                            momentum=0.9, w_out=torch.empty(0)).numel() == 0


@pytest.mark.parametrize("lam, adaptive", [(0.0, False), (0.04, False), (2.0, True)])
def test_a_huge_finite_gradient_gives_no_nan(lam, adaptive):
    """g'^2 overflows to inf above 1.8e19; the compensation lam * g'^2 * (w - w_bak) was then
    0 * inf = NaN where lam is 0 (ASGD), w == w_bak, or DC-ASGD-a's mean square overflowed,
    and the NaN reached the shared model though the gradient was finite."""
    g = torch.tensor([1e19, 2e19, -1e30, 3.0])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ms = torch.zeros(4) if adaptive else None
    out = kernels.dc_update(w.clone(), g, w.clone(), ms, lr=0.1, lam=lam)
    assert torch.isfinite(out).all(), out
    assert torch.equal(out, w - 0.1 * g)  # w == w_bak: no compensation, plain SGD
    ms = torch.zeros(4) if adaptive else None
    out = kernels.dc_update(w.clone(), g, w - 0.5, ms, lr=0.1, lam=lam)
    assert not out.isnan().any(), out  # inf where lam * g'^2 * 0.5 itself exceeds float32
    assert torch.isfinite(out[:2]).all(), out
    if lam == 0:
        assert torch.equal(out, w - 0.1 * g)


def test_an_overflowing_mean_square_is_clamped_and_decays_back():
    """DC-ASGD-a's ms = m * ms + (1 - m) * g'^2 overflowed to inf for |g'| > 1.8e19, and inf
    never decays: lam_t = lam / sqrt(ms) stayed 0 for that element for the rest of the run
    (silently plain ASGD). It is clamped to FLT_MAX and decays back as a mean square should."""
    w, w_bak = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])
    ms = torch.zeros(2)
    kernels.dc_update(w.clone(), torch.tensor([2e19, 1.0]), w_bak, ms, lr=0.1, lam=2.0)
    assert ms[0] == FLT_MAX, ms  # finite: the true (1 - m) * g'^2 is of that order
    want = reference(w, torch.tensor([2e19, 1.0]), w_bak, torch.zeros(2), lr=0.1, lam=2.0,
                     ms_decay=0.95, weight_decay=0.0, momentum=0.0)[2]
    assert want[0] == FLT_MAX, want
    g = torch.ones(2)
    for _ in range(2000):  # 0.95^2000 * FLT_MAX is ~1e-6: ms is back at g'^2 = 1
        out = kernels.dc_update(w.clone(), g, w_bak, ms, lr=0.1, lam=2.0)
    torch.testing.assert_close(ms, torch.ones(2))
    plain = w - 0.1 * g
    assert (out < plain).all(), (out, plain)  # compensated again: lam_t > 0
    # an inf ms (a checkpoint written before the clamp) heals at the next push; a NaN stays
    ms = torch.tensor([float("inf"), float("nan")])
    kernels.dc_update(w.clone(), g, w_bak, ms, lr=0.1, lam=2.0)
    assert ms[0] == FLT_MAX and ms[1].isnan(), ms


@pytest.mark.parametrize("case, pattern", [
    ("noncontiguous", "w is not contiguous"),
    ("float64", "g has dtype torch.float64"),
    ("size", "w_bak has 5 elements, w has 6"),
    ("ms_size", "ms has 3 elements"),
    ("overlap", "out overlaps w"),
    ("outputs_alias", "out overlaps ms"),
    ("decay", "ms_decay 1.5"),
    ("momentum", "momentum 1.0 is outside"),
    ("velocity_alias", "ms overlaps v"),
    ("type", "g must be a torch.Tensor"),
    # Library use: an AttributeError on None, and NaN or ascent reaching the model unseen.
    ("none", "w_bak must be a torch.Tensor, not NoneType"),
    ("nan_lr", "lr nan must be a finite number >= 0"),
    ("negative_lam", "lam -1.0 must be a finite number >= 0"),
])
def test_bad_tensors_rejected_with_one_line(case, pattern):
    w, g, w_bak = torch.zeros(6), torch.zeros(6), torch.zeros(6)
    kwargs = {"lr": 0.1}
    args = [w, g, w_bak]
    if case == "noncontiguous":
        args[0] = torch.zeros(12)[::2]
    elif case == "float64":
        args[1] = g.double()
    elif case == "size":
        args[2] = torch.zeros(5)
    elif case == "ms_size":
        args.append(torch.zeros(3))
    elif case == "overlap":
        big = torch.zeros(7)
        args[0], kwargs["out"] = big[:6], big[1:]
    elif case == "outputs_alias":
        ms = torch.zeros(6)
        args.append(ms)
        kwargs["out"] = ms
    elif case == "decay":
        args.append(torch.zeros(6))
        kwargs["ms_decay"] = 1.5
    elif case == "momentum":
        args += [None, torch.zeros(6)]
        kwargs["momentum"] = 1.0
    elif case == "velocity_alias":
        ms = torch.zeros(6)
        args += [ms, ms]
    elif case == "type":
        args[1] = [0.0] * 6
    elif case == "none":
        args[2] = None
    elif case == "nan_lr":
        kwargs["lr"] = float("nan")
    elif case == "negative_lam":
        kwargs["lam"] = -1.0
    before = w.clone()
    with pytest.raises(UsageError, match=pattern) as err:
        kernels.dc_update(*args, **kwargs)
    assert "\n" not in str(err.value)
    assert torch.equal(w, before)


def test_missing_cuda_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    kernels.cuda_library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="CUDA kernel library was not built"):
            kernels.cuda_library()
    finally:
        kernels.cuda_library.cache_clear()


def stale_library(path, *symbols: str) -> None:
    """A shared library at ``path`` that defines only the C functions ``symbols``: one built
    from older sources, before a function was renamed or added."""
    source = path.parent / "stale.c"
    source.write_text("".join(f"int {name}(void) {{ return 0; }}\n" for name in symbols))
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(path)], check=True,
                   timeout=60)


def test_a_missing_library_in_a_source_tree_names_the_source_tree(monkeypatch, tmp_path):
    """After ``pip install .``, ``python -m hpctrain`` run in the checkout imports the checkout's
    unbuilt copy; the error said to reinstall, which changes nothing."""
    tree = tmp_path / "checkout"
    (tree / "hpctrain").mkdir(parents=True)
    assert kernels.rebuild_hint(tree / "hpctrain").startswith("reinstall hpctrain (pip install .")
    (tree / "setup.py").write_text("")
    hint = kernels.rebuild_hint(tree / "hpctrain")
    assert hint.startswith(f"hpctrain is imported from its source tree {tree} (after pip "
                           "install . the current directory comes ahead of the installed copy")
    assert "run from another directory, or build it in place: pip install -e ." in hint
    monkeypatch.setattr(kernels, "_HERE", tree / "hpctrain")
    with pytest.raises(RuntimeError) as e:
        kernels.extension("dc_update")
    assert str(e.value) == (f"hpctrain's library _dc_update is not built in {tree / 'hpctrain'}; "
                            f"{hint}")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build a stale library")
def test_a_stale_shared_memory_library_is_a_clear_error(monkeypatch, tmp_path):
    """The locks' library was bound without the check the kernel libraries have: an older
    build's missing function was ctypes's bare "undefined symbol" AttributeError."""
    from hpctrain.async_ import shm

    name = "_shm_sync" + importlib.machinery.EXTENSION_SUFFIXES[0]
    stale_library(tmp_path / name, "hpctrain_shm_lock_shared", "hpctrain_shm_unlock_shared",
                  "hpctrain_shm_lock_exclusive", "hpctrain_shm_unlock_exclusive")
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    shm.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"shared-memory lock library .* has no "
                           r"hpctrain_shm_accumulate, hpctrain_shm_fetch_add, .* reinstall"):
            shm.library()
    finally:
        shm.library.cache_clear()


@pytest.mark.parametrize("missing", ["_dc_update", "_shm_sync"])
def test_an_async_run_without_its_libraries_is_refused_before_mpi(monkeypatch, tmp_path,
                                                                   missing):
    """Only the CUDA library was checked before MPI: a missing CPU one was a RuntimeError on
    every rank at the first push, exit 1."""
    import hpctrain
    from hpctrain.async_ import shm
    from hpctrain.async_.algorithm import ASGD

    for lib in ROOT.glob("hpctrain/_*.so"):
        if not lib.name.startswith(missing):
            (tmp_path / lib.name).symlink_to(lib)
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    for library in (kernels.cpu_library, shm.library):
        library.cache_clear()
    config = hpctrain.RunConfig(algo="asgd", algorithm=hpctrain.algorithm_options("asgd")(),
                                device="cpu")
    try:
        with pytest.raises(UsageError, match=rf"^RunConfig.algo='asgd' with "  # from Python
                                             rf"RunConfig.device='cpu': hpctrain's "
                                             rf"library {missing} is not built"):
            ASGD.check(config, 2, 64)
    finally:
        for library in (kernels.cpu_library, shm.library):
            library.cache_clear()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build a stale library")
@pytest.mark.parametrize("which, name, kept, missing", [
    ("cpu_library", "_dc_update" + importlib.machinery.EXTENSION_SUFFIXES[0],
     "hpctrain_dc_step", "hpctrain_dc_openmp"),
    ("cuda_library", "_dc_update_cuda.so", "hpctrain_dc_step_cuda",
     "hpctrain_cuda_error_string"),
])
def test_a_stale_library_is_a_clear_error_and_info_says_why(monkeypatch, tmp_path, which, name,
                                                            kept, missing):
    """ctypes's AttributeError ("undefined symbol") was raised as is, and ``hpctrain info``,
    which reports a library that does not load, aborted on it."""
    stale_library(tmp_path / name, kept)
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    library = getattr(kernels, which)
    library.cache_clear()
    try:
        with pytest.raises(RuntimeError) as e:
            library()
        assert str(e.value) == (
            f"hpctrain's {'CUDA' if which == 'cuda_library' else 'CPU'} kernel library "
            f"{tmp_path / name} has no {missing} (built from older sources?); reinstall "
            f"hpctrain (pip install . from its checkout; make setup in a development one)")
        assert cli._loads(library) == str(e.value)  # info's kernel_cpu / kernel_cuda line
    finally:
        library.cache_clear()


@pytest.mark.parametrize("value, aware, forced_by", [
    ("1", True, "HPCTRAIN_CUDA_AWARE_MPI=1"),
    ("off", False, "HPCTRAIN_CUDA_AWARE_MPI=off"),
    ("", None, None),  # not an override: the library's answer, as devices.cuda_aware_mpi reads it
    (None, None, None),
])
def test_info_says_when_cuda_aware_mpi_is_forced(monkeypatch, value, aware, forced_by):
    """``hpctrain info`` printed ``cuda_aware_mpi: true`` under HPCTRAIN_CUDA_AWARE_MPI=1
    without saying the variable, not the MPI library, answered; then it said so in that
    key, a string in place of the bool (``"yes (forced by ...)"``). The bool stays; the
    variable is in ``cuda_aware_mpi_forced_by``."""
    if value is None:
        monkeypatch.delenv("HPCTRAIN_CUDA_AWARE_MPI", raising=False)
    else:
        monkeypatch.setenv("HPCTRAIN_CUDA_AWARE_MPI", value)
    if aware is not None:  # what info's cuda_aware_mpi says, from devices.describe
        assert devices.describe()["cuda_aware_mpi"] is aware
    assert cli._cuda_aware_forced_by() == forced_by


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: CUDA compile check "
                    "skipped")
def test_cuda_kernel_compiles_and_links(tmp_path):
    lib = tmp_path / "dc_update_cuda.so"
    cmd = ["nvcc", "-O3", "-std=c++17", "--fmad=false", "-shared", "-Xcompiler",
           "-fPIC,-Wall,-Werror", "-gencode=arch=compute_80,code=sm_80",
           str(ROOT / "kernels" / "dc_update.cu"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cuda = ctypes.CDLL(str(lib))
    cuda.hpctrain_dc_step_cuda.restype = ctypes.c_int
    # No elements: returns success before touching the device, so it runs without a GPU.
    assert cuda.hpctrain_dc_step_cuda(*[None] * 8, ctypes.c_int64(0),
                                      *[ctypes.c_float(0.1)] * 5, None) == 0
    cuda.hpctrain_cuda_error_string.restype = ctypes.c_char_p
    assert cuda.hpctrain_cuda_error_string(0) == b"no error"


def test_a_kernel_built_for_another_machine_says_what_to_do():
    """An nvcc newer than the driver builds a library that loads and then fails at its first
    call with CUDA's bare "CUDA driver version is insufficient": the error names the fix."""
    for err in (35, 222):  # insufficient driver, unsupported PTX version
        assert "newer than this node's driver" in kernels.cuda_error_advice(err)
        assert "CUDA_HOME" in kernels.cuda_error_advice(err)
    assert "HPCTRAIN_CUDA_ARCH" in kernels.cuda_error_advice(209)  # no kernel image
    assert kernels.cuda_error_advice(2) == ""  # out of memory: nothing about the build


def test_setup_warns_when_nvcc_and_torchs_cuda_differ(monkeypatch):
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)  # its definitions only
    mismatch = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_module")["cuda_mismatch"]
    warning = mismatch((13, 0), "12.8")
    assert "nvcc is CUDA 13.0, torch was built with CUDA 12.8" in warning
    assert "CUDA_HOME to a CUDA 12 toolkit" in warning
    assert mismatch((12, 4), "12.8") is None  # the same major version
    assert mismatch((13, 0), None) is None and mismatch(None, "12.8") is None  # unknown


def test_an_editable_install_builds_without_a_traceback(monkeypatch, tmp_path):
    """A user trial: ``make setup``'s ``pip install -e .`` printed setuptools' "Customization
    incompatible with editable install" and a FileNotFoundError traceback: build_py copies
    nothing in editable mode, so ``<build_lib>/hpctrain/_build.py`` had no folder. An editable
    copy is the checkout, whose commit provenance asks git for: nothing to write."""
    import runpy

    import setuptools
    from setuptools.dist import Distribution

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)  # its definitions only
    build_py = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_module")["BuildWithCommit"]
    cmd = build_py(Distribution({"name": "hpctrain", "packages": ["hpctrain"]}))
    cmd.initialize_options()
    cmd.finalize_options()
    cmd.editable_mode, cmd.build_lib = True, str(tmp_path)
    cmd.run()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(gpu_missing() is not None, reason=str(gpu_missing()))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_cuda_matches_reference(n, variant, offset):
    host = inputs(n, 4, *VARIANTS[variant])
    want_w, want_d, want_ms, want_v = reference(*host, **HYPER)

    def device():
        return [torch.zeros(n + offset, device="cuda")[offset:].copy_(t) if t is not None
                else None for t in host]

    dev = device()
    w_new = torch.empty_like(dev[0])
    d = kernels.dc_delta(*dev, **HYPER, w_out=w_new)
    close(d.cpu(), want_d)
    close(w_new.cpu(), want_w)
    for got, want in ((dev[3], want_ms), (dev[4], want_v)):
        if got is not None:
            close(got.cpu(), want)
    dev = device()
    kernels.dc_update(*dev, **HYPER)
    close(dev[0].cpu(), want_w)
