"""A small ResNet-style CNN for ``python -m sqcompile explain examples/explain_demo.py``.

Conv stem, two residual blocks (conv, BatchNorm, ReLU, residual add), global pooling and a
linear classifier: the layer types the per-op precision report has rows for.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(BasicBlock(channels), BasicBlock(channels))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer1(x)
        return self.fc(x.mean((2, 3)))


def build():
    """``(model, example_inputs)`` for the sqcompile CLI."""
    torch.manual_seed(0)
    return SmallResNet(), (torch.randn(8, 3, 16, 16),)


if __name__ == "__main__":
    from sqcompile.explain import explain

    model, inputs = build()
    print(explain(model, *inputs, collect_stats=True).report)
