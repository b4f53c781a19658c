"""pickled.large_messages' pickling: a CPU tensor's memory travels as an out-of-band buffer
(pickle protocol 5) instead of through torch's own pickling, and comes back as the same
tensor. Unit tests pickle in one process; the MPI tests send through every wrapped call.

MPI tests: mpirun -np 2|4 python -m pytest --with-mpi -m mpi tests/test_out_of_band.py
"""

import pickle

import pytest
import torch

from hpctrain import comm, pickled
from hpctrain.pickled import OutOfBand

unit = pytest.mark.unit
mpi = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(60)]


def _tensors() -> dict:
    """Tensors of every kind the pickler meets: its own and those it leaves to torch."""
    return {"matrix": torch.arange(10.0).reshape(2, 5),
            "transposed": torch.arange(12.0).reshape(3, 4).t(),
            "slice": torch.arange(20, dtype=torch.int64)[5:9],
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
            "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "half": torch.tensor([0.1, 7.0], dtype=torch.float16),
            "flags": torch.tensor([True, False, True]),
            "conj": torch.tensor([1 + 2j, 3 - 1j]).conj(),
            "neg": torch.tensor([1.0, 2.0])._neg_view(),
            "parameter": torch.nn.Parameter(torch.ones(2)),
            "needs_grad": torch.ones(2, requires_grad=True),
            "sparse": torch.eye(3).to_sparse()}


def _send(obj, received: bool = True):
    """``obj`` pickled as pkl5 pickles, and unpickled from copies of its buffers (as a
    receiver has them) or from the buffers themselves (as a broadcast's root does)."""
    buffers = []
    data = pickle.dumps(OutOfBand(obj), protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[bytearray(b) for b in buffers] if received else buffers)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.layout != torch.strided:
        return a.layout == b.layout and torch.equal(a.to_dense(), b.to_dense())
    return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
            and a.requires_grad == b.requires_grad and torch.equal(a, b))


@unit
@pytest.mark.parametrize("received", [True, False], ids=["receiver", "root"])
def test_every_kind_of_tensor_comes_back_the_same(received):
    sent = _tensors()
    back = _send({"state": sent, "info": {"updates": 7}}, received)
    assert back["info"] == {"updates": 7}
    assert set(back["state"]) == set(sent)
    for name, tensor in sent.items():
        assert _same(tensor, back["state"][name]), name


@unit
def test_a_tensors_memory_goes_out_of_band_as_it_is():
    """One buffer, the tensor's own memory (torch's pickling copied it into the pickle)."""
    big = torch.ones(2**20)
    buffers = []
    data = pickle.dumps(OutOfBand({"big": big}), protocol=5, buffer_callback=buffers.append)
    assert len(data) < 1024 and len(buffers) == 1
    assert memoryview(buffers[0]).nbytes == big.nbytes
    assert torch.frombuffer(buffers[0], dtype=torch.float32).data_ptr() == big.data_ptr()


@unit
def test_a_receivers_tensor_is_its_buffer_and_a_roots_is_a_copy():
    """A receiver's tensor uses the memory MPI received into (no copy of gigabytes); the
    root's is a copy, so that changing it leaves what was sent as it was."""
    sent = torch.arange(8.0)
    buffers = []
    data = pickle.dumps(OutOfBand(sent), protocol=5, buffer_callback=buffers.append)
    received = [bytearray(b) for b in buffers]
    back = pickle.loads(data, buffers=received)
    back[0] = 42.0
    assert torch.frombuffer(received[0], dtype=torch.float32)[0] == 42.0
    mine = pickle.loads(data, buffers=buffers)
    mine[1] = -1.0
    assert sent.tolist() == [float(i) for i in range(8)]


# An elastic commit's pickle of {"t": torch.arange(3.0)} as hpctrain wrote it before
# hpctrain.pickled split off from hpctrain.comm (fbc51df): its tensor named by comm's path.
COMMIT_BEFORE_THE_SPLIT = (
    b"\x80\x05\x95V\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01t\x94\x8c\rhpctrain.comm"
    b"\x94\x8c\x07_tensor\x94\x93\x94\x96\x0c\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x80?\x00\x00\x00@\x94\x8c\x05torch\x94\x8c\x07float32\x94\x93"
    b"\x94K\x03\x85\x94\x87\x94R\x94s.")


@unit
def test_an_elastic_commit_written_before_the_split_still_loads():
    """The move to hpctrain.pickled left commits on disk naming hpctrain.comm._tensor, which
    a restarted job of this version refused ("Can't get attribute '_tensor'")."""
    state = pickle.loads(COMMIT_BEFORE_THE_SPLIT)
    assert torch.equal(state["t"], torch.arange(3.0))


@unit
def test_in_band_and_older_protocols_pickle_it_whole():
    """Pickled without a buffer callback, or with protocol 4 (torch.save's pickles), it is the
    object itself again."""
    sent = {"t": torch.arange(5), "n": [1, 2]}
    for protocol in (2, 4, 5):
        back = pickle.loads(pickle.dumps(OutOfBand(sent), protocol=protocol))
        assert back["n"] == [1, 2] and torch.equal(back["t"], sent["t"]), protocol


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_every_call_of_large_messages_carries_tensors():
    """bcast, gather, scatter, allgather, send and isend, each with tensors of each rank."""
    world = comm.init("multiple").COMM_WORLD
    channel = pickled.large_messages(world)
    me, size = world.Get_rank(), world.Get_size()

    def mine(r: int) -> dict:
        return {"rank": r, "t": torch.full((3, 2), float(r)), "b": torch.arange(r + 1) > 0}

    def check(got: dict, r: int) -> None:
        assert got["rank"] == r and torch.equal(got["t"], torch.full((3, 2), float(r)))
        assert torch.equal(got["b"], torch.arange(r + 1) > 0)

    check(channel.bcast(mine(0) if me == 0 else None, root=0), 0)
    gathered = channel.gather(mine(me), root=size - 1)
    if me == size - 1:
        for r, got in enumerate(gathered):
            check(got, r)
    else:
        assert gathered is None
    check(channel.scatter([mine(r) for r in range(size)] if me == 0 else None, root=0), me)
    for r, got in enumerate(channel.allgather(mine(me))):
        check(got, r)
    after, before = (me + 1) % size, (me - 1) % size
    request = channel.isend(mine(me), dest=after, tag=3)
    check(channel.recv(source=before, tag=3), before)
    request.wait()
    if me == 0:
        channel.send(mine(0), dest=1, tag=4)
    elif me == 1:
        check(channel.recv(source=0, tag=4), 0)
