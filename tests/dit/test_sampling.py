from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dit.sampling import guided


class LabelEcho(nn.Module):
    """Predicts, on every pixel, its class label in the first C channels and label + 100 in the
    variance channels: distinct conditional and unconditional outputs."""

    config = SimpleNamespace(class_dropout_prob=0.1, num_classes=10)

    def forward(self, x, t, y):
        label = y.float().reshape(-1, 1, 1, 1).expand_as(x)
        return torch.cat([label, label + 100], dim=1)


@pytest.mark.parametrize("scale", [1.0, 1.5, 4.0])
def test_guidance_extrapolates_from_the_unconditional_output(scale):
    labels = torch.tensor([3, 7])
    x = torch.randn(2, 1, 2, 2)
    out = guided(LabelEcho(), labels, scale)(x, torch.tensor([5, 5]))
    cond, uncond = labels.float().reshape(-1, 1, 1, 1), 10.0  # the null class is num_classes
    expected = uncond + scale * (cond - uncond)
    torch.testing.assert_close(out[:, :1], expected.expand(-1, 1, 2, 2))
    torch.testing.assert_close(out[:, 1:], (cond + 100).expand(-1, 1, 2, 2))  # sigma from the conditional pass


def test_guidance_needs_a_model_trained_with_class_dropout():
    model = LabelEcho()
    model.config = SimpleNamespace(class_dropout_prob=0.0, num_classes=10)
    with pytest.raises(ValueError, match="class dropout"):
        guided(model, torch.tensor([1]), 2.0)
