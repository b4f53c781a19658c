"""``SyncBatchNorm``: batch normalisation with statistics over the batches of all ranks.

In training, each rank computes its per-channel count, mean and sum of squared deviations,
and one ``allgather`` gives every rank every rank's (Chan's parallel combination then gives
the mean and biased variance of the union of the batches, stable where E[x²] - E[x]² is not).
The running statistics are updated with the union's mean and unbiased variance, as
``torch.nn.BatchNorm`` would on one process holding all batches. In backward, the two sums
the input gradient needs (of dy and of dy·(x - mean)) are added over the ranks with one
``allreduce``, so the gradient is that of the union (Horovod does the same with CUDA-only
kernels; this version also runs on CPU). Weight and bias gradients stay local sums, for
``DistributedOptimizer`` to average. In eval mode it is plain batch norm.

Statistics and gradient sums are taken in float32 (float64 for a float64 input), and the
output has the input's dtype: in fp16 (autocast's convolutions) a count above 65504, or a
sum of squares, is inf, as with torch's own kernels, which accumulate in float32 too.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """Horovod's ``SyncBatchNorm(num_features, eps, momentum, affine, track_running_stats)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            return torch.nn.functional.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False,
                0.0, self.eps)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            tracked = self.num_batches_tracked
            assert tracked is not None  # _NormBase registers it with track_running_stats
            tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(tracked)
        from hpctrain import sync as hvd  # the facade: either backend

        if hvd.size() == 1:
            return torch.nn.functional.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, True,
                momentum, self.eps)
        running = self.running_mean if self.training else None
        return _SyncBatchNorm.apply(input, self.weight, self.bias, running,
                                    self.running_var if running is not None else None,
                                    self.eps, momentum)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) as (C, N·*)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _accumulating(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are taken in: float32 at least."""
    return torch.promote_types(dtype, torch.float32)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum):
        acc = _accumulating(input.dtype)
        x = _per_channel(input.detach()).to(acc)
        count = x.shape[1]
        mean = x.mean(1) if count else torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        m2 = ((x - mean[:, None]) ** 2).sum(1)
        n = torch.tensor([float(count)], dtype=x.dtype, device=x.device)
        local = torch.cat([n, mean, m2])
        from hpctrain import sync as hvd

        stats = hvd.synchronize(hvd.allgather_async(local[None], name="sync_batch_norm.stats"))
        counts, means, m2s = stats[:, 0], stats[:, 1:1 + x.shape[0]], stats[:, 1 + x.shape[0]:]
        total = counts.sum()
        g_mean = (counts[:, None] * means).sum(0) / total
        g_m2 = (m2s + counts[:, None] * (means - g_mean) ** 2).sum(0)
        var = g_m2 / total
        if running_mean is not None:
            n = float(total)
            running_mean.mul_(1 - momentum).add_(g_mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * n / max(n - 1, 1), alpha=momentum)
        invstd = torch.rsqrt(var + eps)
        shape = [1, -1] + [1] * (input.dim() - 2)
        xhat = (input.to(acc) - g_mean.view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total, ctx.dtype = total, input.dtype
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, invstd = ctx.saved_tensors
        grad_out = grad_out.to(xhat.dtype)
        dy = _per_channel(grad_out.contiguous())
        xh = _per_channel(xhat)
        sum_dy = dy.sum(1)
        sum_dy_xhat = (dy * xh).sum(1)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight, grad_bias = sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype)
        grad_input = None
        if ctx.needs_input_grad[0]:
            from hpctrain import sync as hvd

            both = hvd.synchronize(hvd.allreduce_async(torch.cat([sum_dy, sum_dy_xhat]),
                                                       op=hvd.Sum, name="sync_batch_norm.grad"))
            g_sum_dy, g_sum_dy_xhat = both.chunk(2)
            shape = [1, -1] + [1] * (grad_out.dim() - 2)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            n = ctx.total
            grad_input = (scale.view(shape) * (grad_out - (g_sum_dy / n).view(shape)
                                               - xhat * (g_sum_dy_xhat / n).view(shape))
                          ).to(ctx.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None
