"""Model shapes and sizes."""

import pytest
import torch

from hpctrain import models
from hpctrain.errors import UsageError


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_models_forward(name, shape):
    model = models.build(name, shape)
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet20_has_0_27m_parameters():
    assert 0.26e6 < models.num_parameters(models.build("resnet20", (3, 32, 32))) < 0.28e6


def test_lenet_classic_size():
    assert models.num_parameters(models.build("lenet", (1, 28, 28))) == 61706


def test_unknown_model():
    with pytest.raises(UsageError, match="unknown model 'vgg'"):
        models.build("vgg", (1, 28, 28))
