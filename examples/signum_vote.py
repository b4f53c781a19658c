"""An algorithm of your own for ``hpctrain train``: signSGD with majority vote (Signum).

    mpirun -np 4 hpctrain train --algo ./examples/signum_vote.py:SignumVote --epochs 2
    mpirun -np 4 hpctrain train --algo ./examples/signum_vote.py:SignumVote --vote mean
    hpctrain bench compare --algos ssgd,./examples/signum_vote.py:SignumVote --out cmp

Each worker keeps a momentum of its own gradients (``--momentum``), sends only the sign of
it (one small integer per parameter instead of a float), and every worker steps by
``lr * sign(sum of the signs)``: the majority's direction (Bernstein et al., "signSGD with
majority vote is communication efficient and fault tolerant", ICLR 2019). ``--vote mean``
steps by the signs' average instead. Everything else (data, model, the learning-rate
schedule, snapshots, checkpoints, evaluation, outputs) is the loop's, as for a built-in
algorithm: the class declares its options and overrides the hooks it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpctrain.algorithm import Algorithm, Options, Setup
from hpctrain.comm import allreduce_bytes
from hpctrain.errors import UsageError
from hpctrain.options import option


@dataclass(frozen=True)
class VoteOptions(Options):
    vote: str = option("majority", "how the workers' signs combine: majority (the sign of "
                       "their sum) or mean (their average)", choices=("majority", "mean"))


class WorkerState:
    """A worker's momentum of its gradients and the bytes of votes it sent: its own, so a
    per-rank part of a checkpoint."""

    def __init__(self, params: list[torch.Tensor]):
        self.buffers = [torch.zeros_like(p) for p in params]
        self.sent = 0

    def state_dict(self) -> dict:
        return {"buffers": self.buffers, "sent": self.sent}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.buffers, state["buffers"], strict=True):
            mine.copy_(saved)
        self.sent = state["sent"]


class SignumVote(Algorithm):
    """Signum with majority vote: the workers agree on each parameter's step direction."""

    name = "signum-vote"
    Options = VoteOptions
    defaults = {"lr": 0.0005, "momentum": 0.9}  # a sign step is lr in every coordinate
    optimizers = ("sgd",)
    summary_fields = {"vote": "how the workers' signs were combined (majority or mean)",
                      "vote_bytes_per_rank": "bytes: the votes one rank sent (an allreduce "
                                             "counted as a ring's, as ssgd's bytes)"}

    @classmethod
    def check(cls, config, ranks: int, samples: int) -> None:
        if ranks > 32767:  # the votes are summed as int16
            raise UsageError(f"--algo {cls.name} sums its votes as int16: at most 32767 ranks")

    def setup(self, s: Setup) -> None:
        self.comm, self.model = s.comm, s.model
        self.params = [p for p in s.model.parameters() if p.requires_grad]
        if self.comm is not None:  # every worker starts from rank 0's model
            for t in s.model.state_dict().values():
                host = t.detach().cpu()
                self.comm.Bcast(host.numpy(), root=0)
                t.copy_(host)
        self.beta = self.config.optim.momentum or 0.0
        self.state = WorkerState(self.params)
        # The step itself: plain SGD on the vote (the loop sets its learning rate).
        self.optimizer = torch.optim.SGD(self.params, lr=self.config.optim.lr)

    def checkpoint_state(self) -> tuple[dict, dict]:
        return {"model": self.model, "optimizer": self.optimizer}, {"worker": self.state}

    def resize_state(self, parts: list[dict], workers: int, position: int) -> list[dict]:
        """Resumed on more workers: a new one starts from an old one's momentum (a running
        mean of gradients like any worker's) but has sent no votes; on fewer, the workers
        left keep their own (the default would copy the byte count and warn of it)."""
        return [{"worker": {**parts[j % len(parts)]["worker"],
                            **({"sent": 0} if j >= len(parts) else {})}}
                for j in range(workers)]

    def apply(self) -> bool:
        signs = []
        for p, m in zip(self.params, self.state.buffers, strict=True):
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            m.mul_(self.beta).add_(grad, alpha=1 - self.beta)
            signs.append(torch.sign(m).reshape(-1))
        votes = torch.cat(signs).to("cpu", torch.int16)
        total = votes.clone()
        if self.comm is not None:
            self.comm.Allreduce(votes.numpy(), total.numpy())  # the sum of the votes
            self.state.sent += allreduce_bytes(votes.numel() * votes.element_size(),
                                               self.comm.Get_size())
        workers = 1 if self.comm is None else self.comm.Get_size()
        step = torch.sign(total) if self.options.vote == "majority" else total / workers
        offset = 0
        for p in self.params:
            p.grad = step[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype)
            offset += p.numel()
        self.optimizer.step()
        return True

    def summary(self, points: list[dict], comm) -> dict:
        return {"vote": self.options.vote, "vote_bytes_per_rank": self.state.sent}
