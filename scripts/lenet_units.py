"""What a LeNet ``model.pt`` does on the Fashion-MNIST test set: per ReLU layer, the share of
units that stay zero on every one of the first 2,000 test images (dead units), how much the
logits vary across those images, and how many images it predicts as each class.

    python scripts/lenet_units.py RUN/model.pt [...]

Used for docs/RESULTS.md ("Why a K = 32 member stays at chance").
"""

import sys

import torch
import torch.nn.functional as F

from hpctrain import data, models


def dead(activations: torch.Tensor) -> float:
    """Share of units (channels or features) that are zero for every image."""
    per_unit = activations.transpose(0, 1).reshape(activations.shape[1], -1)
    return (per_unit.amax(1) == 0).float().mean().item()


test = data.load("fashion-mnist", "test", None)
x = test.images[:2000]
for path in sys.argv[1:]:
    m = models.build("lenet", (1, 28, 28), 10)
    try:
        m.load_state_dict(torch.load(path, weights_only=True))
    except (OSError, RuntimeError) as e:  # another model, or not a model.pt
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), e)
        print(f"{path}: not a LeNet model.pt of Fashion-MNIST (1x28x28, 10 classes): {first}",
              file=sys.stderr)
        sys.exit(2)
    with torch.no_grad():
        conv1 = F.relu(m.conv1(x))
        conv2 = F.relu(m.conv2(F.max_pool2d(conv1, 2)))
        fc1 = F.relu(m.fc1(torch.flatten(F.max_pool2d(conv2, 2), 1)))
        fc2 = F.relu(m.fc2(fc1))
        logits = m.fc3(fc2)
    layers = {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": fc2}
    print(f"{path}: dead units " + ", ".join(f"{n} {dead(a):.2f}" for n, a in layers.items())
          + f"; logit std across images {logits.std(0).mean():.4f}; predicted per class "
          f"{torch.bincount(logits.argmax(1), minlength=10).tolist()}")
