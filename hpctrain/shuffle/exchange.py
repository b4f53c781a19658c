"""Moving samples between ranks with MPI Alltoallv, in rounds of bounded size.

Labels and ids (16 bytes a sample) go in one Alltoallv; images follow in rounds, each rank
sending at most ``chunk_bytes`` per round. Images are gathered into one send buffer per
round and received straight into their final place, so the extra memory is one chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from hpctrain import comm as hcomm
from hpctrain.data import Dataset


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def exchange(comm, source: Dataset, rows: torch.Tensor, dest: torch.Tensor,
             chunk_bytes: int) -> tuple[Dataset, int]:
    """Send ``source[rows[j]]`` to rank ``dest[j]`` for every j; collective on ``comm``.

    Returns the samples this rank receives, ordered by source rank and then by their j on the
    source, and the number of bytes this rank sent to other ranks.
    """
    MPI = hcomm.mpi()
    ranks, me = comm.Get_size(), comm.Get_rank()
    by_dest = torch.sort(dest, stable=True).indices
    send_rows = rows[by_dest]
    send = torch.bincount(dest, minlength=ranks).numpy().astype(np.int64)
    counts = np.empty((ranks, ranks), np.int64)  # counts[s, d]: rows rank s sends to rank d
    comm.Allgather(send, counts)
    recv = np.ascontiguousarray(counts[:, me])
    sdispl, rdispl = _displacements(send), _displacements(recv)
    total = int(recv.sum())

    meta = torch.stack([source.labels[send_rows], source.ids[send_rows]], dim=1).numpy()
    got = np.empty((total, 2), np.int64)
    comm.Alltoallv([meta, (2 * send, 2 * sdispl), MPI.INT64_T],
                   [got, (2 * recv, 2 * rdispl), MPI.INT64_T])

    shape = source.shape
    flat = source.images.reshape(len(source), -1)
    width = flat.shape[1]
    images = torch.empty((total, width), dtype=torch.float32)
    per = max(1, chunk_bytes // (4 * width * ranks))  # rows per destination per round
    rounds = -(-int(counts.max()) // per) if counts.size else 0
    buf = torch.empty((min(per * ranks, max(1, int(send.sum()))), width), dtype=torch.float32)
    row_type = MPI.FLOAT.Create_contiguous(width).Commit()
    try:
        for t in range(rounds):
            lo = np.minimum(t * per, send)
            n_send = np.minimum(send - lo, per)
            n_recv = np.minimum(np.maximum(recv - t * per, 0), per)
            pick = torch.cat([send_rows[sdispl[d] + lo[d]:sdispl[d] + lo[d] + n_send[d]]
                              for d in range(ranks)])
            torch.index_select(flat, 0, pick, out=buf[:len(pick)])
            comm.Alltoallv([buf.numpy(), (n_send, _displacements(n_send)), row_type],
                           [images.numpy(), (n_recv, rdispl + np.minimum(t * per, recv)), row_type])
    finally:
        row_type.Free()
    sent = int(send.sum() - send[me]) * (4 * width + 16)
    labels, ids = torch.from_numpy(got[:, 0].copy()), torch.from_numpy(got[:, 1].copy())
    return Dataset(source.name, images.reshape(total, *shape), labels, ids,
                   source.num_classes), sent
