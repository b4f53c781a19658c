"""Users' own data: ``--dataset npz:PATH``, ``imagefolder:PATH`` or ``MODULE:CALLABLE``.

:mod:`hpctrain.data` hands every ``--dataset`` that is not a built-in name to this package, so
the rest of hpctrain (both placements, the shuffles, EC's relabelling) reads user data through
the same four calls as the built-in sets: ``size``, ``load``, ``load_labels``, ``load_indices``.

Formats:

- ``npz:PATH``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (``np.savez``), and
  optionally ``num_classes``, in either byte order; other arrays are not read, and one named
  almost as one of these that the file lacks (``n_classes`` without ``num_classes``,
  ``X_train`` without ``x_train``: :func:`.npz._npz_typos`) is refused as its likely typo. Members
  stored uncompressed (``np.savez``) are memory-mapped, so a rank that holds a shard reads
  only its rows; compressed ones (``np.savez_compressed``) are read whole, and let go once the
  rank took its part (:func:`release`).
- ``imagefolder:PATH``: ``PATH/train/<class>/<image>`` and ``PATH/test/<class>/<image>``
  (PNG, JPEG, BMP, GIF, TIFF, WebP; Pillow decodes them). Classes are the sorted folder names
  of ``train``, each holding an image; hidden folders and files (``.ipynb_checkpoints``) are
  skipped. Samples are numbered in a fixed pseudo-random order (seed 0), so blocks in
  "file order" are not one class each; a rank decodes only the images it holds. Images are
  grey (one channel) if the first one is, else RGB (16-bit grey scaled to 8 bits), and must
  all have its size (checked for the first image before MPI starts, for each as it is read).
- ``MODULE:CALLABLE`` or ``./FILE.py:CALLABLE`` (:mod:`hpctrain.plugins`): called once per
  process (with ``data_dir=``, made absolute, if it takes that argument; torch's, numpy's and
  Python's global random numbers seeded to 0 during the call, so every rank gets the same
  data; called again only to read a split :func:`release` let go) and returning
  ``(train, test)`` or ``{"train": ..., "test": ..., "num_classes": C}`` (no other key),
  each set either ``(x, y)`` (tensors or arrays) or a map-style ``torch.utils.data.Dataset``
  of ``(x, y)`` items. A Dataset is read item by item, only the items a rank holds; its labels
  come from its ``targets`` attribute when it has one (else every item is read once to find
  them; an item whose label is not its ``targets`` entry is refused as it is read, item 0
  before MPI starts). An item
  that raises when read, or is no ``(x, y)`` pair with an integer label, is named by its
  index.

Samples are ``N x C x H x W`` (``N x H x W`` gets one channel; ``N x H x W x C`` is warned
of, :func:`channels_last`) or any shape a model of the user's own takes; uint8 values are
scaled to [0, 1], every other type (floats, int16, uint16, ...) is kept as given, as float32,
so a uint8 split needs a uint8 partner; an integer beyond 2**24 in magnitude, which float32
would round, is refused (:func:`.samples.exact_in_float32`). The training samples of an npz file or
a loader are numbered in a fixed pseudo-random order (seed 0), as an image folder's are
(:func:`.samples.numbered`): ``--partition iid`` cuts that order into the ranks' blocks. Labels must
be integers in ``[0, num_classes)``; ``num_classes`` defaults to the largest label plus one, and
either way must be one whole number from 2 to ``MAX_CLASSES``. Neither split may be empty.
Every check fails with one line naming the data set and what is wrong.

The package, one concept a module, each depending only on those above it:

- :mod:`.samples`: what every source's samples and labels pass before training reads them
  (sample shape, scale, integers float32 would round, labels, the number of classes, the
  seeded numbering), and how a refusal names the data set (:func:`.samples.dataset_said`);
- :mod:`.npz`: ``npz:PATH``, its arrays checked and memory-mapped (:class:`.npz.NpzSource`);
- :mod:`.imagefolder`: ``imagefolder:PATH``, its class folders listed and images decoded
  (:class:`.imagefolder.ImageFolderSource`);
- :mod:`.loader`: the user's ``MODULE:CALLABLE``, called and its sets or Dataset items
  checked (:class:`.loader.CallableSource`);
- :mod:`.reading`: the calls :mod:`hpctrain.data` makes (``size``, ``load``, ...), the
  ``--dataset`` value's form, and each source opened once per process.

What :mod:`hpctrain.data`, the launch checks and the benchmarks call is importable from
``hpctrain.userdata`` itself, as it was when it was one module; the rest from the module that
holds it.
"""

from hpctrain.userdata.reading import (
    FORMATS,
    absolute,
    absolute_dir,
    channels_last,
    check_form,
    class_names,
    dataset_name,
    describe,
    forget,
    is_loader,
    is_user,
    items_fixed,
    load,
    load_indices,
    load_labels,
    release,
    size,
)
from hpctrain.userdata.samples import MAX_CLASSES

__all__ = ["FORMATS", "MAX_CLASSES", "absolute", "absolute_dir", "channels_last", "check_form",
           "class_names", "dataset_name", "describe", "forget", "is_loader", "is_user",
           "items_fixed", "load", "load_indices", "load_labels", "release", "size"]
