"""Moving samples between ranks with MPI Alltoallv, in rounds of bounded size.

Labels and ids (16 bytes a sample) go in one Alltoallv. Images follow in rounds: each rank
gathers at most ``chunk_bytes`` of rows into a send buffer, one Alltoallv moves them, and the
receiver copies each arriving row to its final place. The round buffers are kept between
exchanges (fresh pages cost more than the copies), so the extra memory is two chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from hpctrain import comm as hcomm
from hpctrain.data import Dataset


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def empty_like(d: Dataset) -> Dataset:
    """An uninitialised Dataset shaped like ``d``, with as many samples."""
    n = len(d)
    return Dataset(d.name, torch.empty((n, *d.shape), dtype=d.images.dtype),
                   torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long),
                   d.num_classes)


PHASES = ("metadata", "gather", "alltoallv", "scatter")


class Exchanger:
    """Sends samples to other ranks of ``comm``, keeping its round buffers between calls.

    ``seconds`` adds up the wall time of each phase of all moves so far (``PHASES``:
    counts, labels and ids; gathering images into the send buffer; their Alltoallv; copying
    arrivals to their rows); the Alltoallv includes waiting for the slowest rank.
    """

    def __init__(self, comm, chunk_bytes: int) -> None:
        self.comm, self.chunk_bytes = comm, chunk_bytes
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _lap(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - start
        return now

    def _round_buffers(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._buffers
        if buffers is None or buffers[0].shape[0] < rows \
                or buffers[0].shape[1:] != like.shape[1:] or buffers[0].dtype != like.dtype:
            shape = (rows, *like.shape[1:])
            buffers = self._buffers = (like.new_empty(shape), like.new_empty(shape))
        return buffers

    def move(self, source: Dataset, rows: torch.Tensor, dest: torch.Tensor, out: Dataset,
             place: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Send ``source[rows[j]]`` to rank ``dest[j]`` for every j; collective.

        What arrives is written to ``out`` at rows ``place(ids)``, where ``ids`` are the
        arriving samples' ids ordered by source rank, then by j on the source. Returns the
        bytes this rank sent to other ranks.
        """
        MPI = hcomm.mpi()
        ranks, me = self.comm.Get_size(), self.comm.Get_rank()
        clock = time.perf_counter()
        send_rows = rows[torch.sort(dest, stable=True).indices]
        send = torch.bincount(dest, minlength=ranks).numpy().astype(np.int64)
        counts = np.empty((ranks, ranks), np.int64)  # counts[s, d]: rows rank s sends rank d
        self.comm.Allgather(send, counts)
        recv = np.ascontiguousarray(counts[:, me])
        sdispl, rdispl = _displacements(send), _displacements(recv)

        meta = torch.stack([source.labels[send_rows], source.ids[send_rows]], dim=1).numpy()
        got = np.empty((int(recv.sum()), 2), np.int64)
        self.comm.Alltoallv([meta, (2 * send, 2 * sdispl), MPI.INT64_T],
                            [got, (2 * recv, 2 * rdispl), MPI.INT64_T])
        got_t = torch.from_numpy(got)
        where = place(got_t[:, 1])
        out.labels[where] = got_t[:, 0]
        out.ids[where] = got_t[:, 1]

        # Rows by their size, not -1: a rank holding or receiving none has 0-row tensors.
        flat = source.images.reshape(len(source), math.prod(source.images.shape[1:]))
        out_flat = out.images.view(len(out), math.prod(out.images.shape[1:])).numpy()
        row_bytes = flat.element_size() * flat.shape[1]
        per = max(1, self.chunk_bytes // (row_bytes * ranks))  # rows per peer per round
        rounds = -(-int(counts.max()) // per)
        most = max(int(counts.sum(1).max()), int(counts.sum(0).max()), 1)  # sent or received
        sbuf, rbuf = self._round_buffers(min(per * ranks, most), flat)
        row = MPI.BYTE.Create_contiguous(row_bytes).Commit()
        clock = self._lap("metadata", clock)
        try:
            for t in range(rounds):
                lo_s, lo_r = np.minimum(t * per, send), np.minimum(t * per, recv)
                n_send, n_recv = np.minimum(send - lo_s, per), np.minimum(recv - lo_r, per)
                pick = torch.cat([send_rows[sdispl[d] + lo_s[d]:][:n_send[d]]
                                  for d in range(ranks)])
                torch.index_select(flat, 0, pick, out=sbuf[:len(pick)])
                clock = self._lap("gather", clock)
                self.comm.Alltoallv([sbuf.numpy(), (n_send, _displacements(n_send)), row],
                                    [rbuf.numpy(), (n_recv, _displacements(n_recv)), row])
                clock = self._lap("alltoallv", clock)
                dst = torch.cat([where[rdispl[s] + lo_r[s]:][:n_recv[s]] for s in range(ranks)])
                # numpy's row scatter runs at memcpy speed, torch's index_copy_ ~5x slower
                out_flat[dst.numpy()] = rbuf.numpy()[:len(dst)]
                clock = self._lap("scatter", clock)
        finally:
            row.Free()
        return int(send.sum() - send[me]) * (row_bytes + 16)
