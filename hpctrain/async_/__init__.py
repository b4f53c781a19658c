"""Asynchronous training on MPI one-sided windows: ASGD, DC-ASGD-c and DC-ASGD-a.

Use from your own loop, as with Horovod (MPI at thread level ``serialized``)::

    MPI = hpctrain.comm.init("serialized")
    store = ParameterStore(trainable(model), servers=0, consistency="locked")  # model loaded
    if store.is_worker:
        opt = DCASGD(model, store, lr=0.05, adaptive=True)
        for x, y in batches:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    store.finish()
    if store.is_worker:
        opt.pull()  # the final parameters (buffers stay each worker's own)
    store.close()

Design choices (DESIGN.md's "The async store on RMA windows", with these decisions):

- One window per shard (``comm=`` always given), each headed by an int64 update count (and,
  for shared memory, two lock words). Per-shard windows give per-shard exclusive locks, so
  several shards on one host do not serialise each other; the count makes the ``locked``
  lock order observable (each push reports the count it found on every shard), which turns
  "serialisable" into a checkable property: the tests replay the logged gradients shard by
  shard in count order.
- Shared memory on one node (a better design than DESIGN.md's "Win.Allocate always" there):
  when every rank of the store is on one node and the MPI can, the windows are made with
  ``Win.Allocate_shared`` and a ``locked`` push runs the fused kernel on the shard in place
  under the exclusive lock, writing the new values into the shard and into the worker's
  model in the same pass: 20 bytes per element instead of Get + kernel + Put's 32, about 2x
  faster per push (see docs/BENCHMARKS.md). An ``atomic`` push's kernel reads the shard in
  place too (aligned float loads: each element old or new, as an accumulate read gives) and
  adds its delta under the shard's accumulate lock. After set-up no MPI call touches
  shared windows: the locks and counters are CPU atomics (``shm``), because MPICH and Intel
  MPI grant MPI's own locks, even on shared memory, only when the owner calls MPI; otherwise
  (several nodes, or an osc component without shared windows such as osc/pt2pt)
  ``Win.Allocate``, MPI's locks and Get/Put.
- Dedicated servers are the *last* N ranks, so rank 0 is always worker 0 (logs, progress
  bar, ``--slowdown 0:F`` names a worker). Shards are dealt round-robin to the hosts; the
  default count is at least one shard per worker and equal on every host. Worker k starts at
  shard ``k*S/W`` and walks round-robin, so workers rarely queue on the same lock.
- The fused kernel writes the new shard straight into the worker's model (Get/Put path: it
  *is* the buffer that is Put back), so after a push the model holds the newest values it
  read plus its own step, and the next gradient is computed at exactly those values
  (``w_bak``) without a second read. ``atomic`` does the same with ``w_read + d`` while it
  accumulates d.
- Weight decay is ``wd * w_bak``: the regulariser's gradient at the model the loss gradient
  was computed at, so ``g'`` is one consistent gradient and the compensation applies to it.
- Optional momentum (not in the paper's algorithm; ``momentum=0`` is exactly the paper): each
  worker keeps a velocity of its own compensated steps and pushes it, as the authors' MXNet
  DCASGD optimizer does: the velocity holds steps, ``v = mu*v + d`` with ``d`` the
  compensated step ``-lr*(g' + lam_t*g'^2*(w - w_bak))``, and ``v`` is pushed (torch's SGD in a
  Hogwild run keeps gradients and multiplies by the current rate, the same only at a constant
  learning rate; under a schedule the two differ). It is fused into
  the same kernel pass (+8 bytes per element). Note that M workers' velocities all act on the
  global model, each decaying only at its own worker's pace, and asynchrony adds momentum of
  its own (Mitliagkas et al., 2016): async runs want far less momentum than sync ones.
  Measured (LeNet, Fashion-MNIST, 4 workers, 5 epochs, dcasgd-a): momentum 0.9 with lr 0.05
  gave 0.853 test accuracy, momentum 0 with lr 0.05 0.869, momentum 0 with lr 0.1 0.885.
- Staleness: ``locked`` pushes read every shard's count under its lock, so tau is exact: the
  most updates by other workers any shard took between this worker's read of it (its
  previous push or pull) and this push. ``atomic``: the counter window is incremented
  (``Fetch_and_op``) once per push, after its last shard; tau = the value fetched minus the
  counter just after this worker's previous push (or its pull): the other workers' pushes
  completed in between, off by those in flight. With workers in lock-step taking turns, tau
  is exactly M-1 either way (first round: the worker's turn index). ``atomic``'s mean tau
  over a run is set by the push counts (about M-1, never above), not the timing; ``locked``'s
  exceeds it by what pushes overlapping shard by shard add (docs/DESIGN.md §5); the tail
  (p90, p99, max) is what differs.
- Progress without an MPI progress thread: hosting ranks serve inside :meth:`finish`
  (``Iprobe`` then a short sleep) until every worker has said it is done; dedicated servers
  call it at once. With ``servers=0`` across nodes without RDMA a busy worker does not serve
  its shards: use ``servers=N`` there (on one node the windows are shared memory and need no
  help). ``atomic`` is element-wise atomic only: a read may mix old and new elements.
- Buffers (BatchNorm's running mean and variance) and frozen parameters (``requires_grad``
  False) are not in the store: only trainable parameters get gradients to push. Each worker
  keeps its own running statistics, estimated on its own batches at the global weights it
  keeps pulling; snapshots, checkpoints and the saved model take worker 0's, so evaluation
  uses the global weights with one worker's statistics (for LeNet and the MLP, which have no
  buffers, the model is exactly the store's).
- Stopping by a global budget: before each step a worker claims a ticket from the counter
  window's second int64 (:meth:`ParameterStore.claim`) and stops once the tickets reach the
  run's updates (``--epochs`` x updates per epoch), so the run makes exactly that many pushes,
  fast workers do more of the work and a straggler does not hold the job back; the
  learning-rate schedule follows the global update count.
- Bounded staleness (SSP, :mod:`hpctrain.async_.ssp`): :class:`StalenessBound` keeps every
  worker's clock (its pushes) in a window on the counter's host; a worker more than S clocks
  ahead of the slowest running one waits before its next gradient, which bounds a push's tau
  by 2(S+1)(M-1), and by (2S+1)(M-1) where the worker then reads the store as SSP promises
  (hpctrain's ssp does); S = 0 runs in rounds of one push per worker. Stopped or barrier-bound
  workers ``park()`` so that they hold nobody back.
"""

from hpctrain.async_.optim import ASGD, DCASGD, flatten_parameters, trainable
from hpctrain.async_.ssp import StalenessBound
from hpctrain.async_.store import CONSISTENCIES, ParameterStore, Push, shard_bounds

__all__ = ["ASGD", "CONSISTENCIES", "DCASGD", "ParameterStore", "Push", "StalenessBound",
           "flatten_parameters", "shard_bounds", "trainable"]
