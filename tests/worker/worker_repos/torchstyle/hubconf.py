"""Test repository written for torch.hub: it imports ``torch`` (served by oneflow.mock_torch)."""
import torch
import torch.nn as nn

dependencies = ["torch"]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return torch.relu(self.fc(x))


def tiny(seed=0):
    """A torch-style module."""
    torch.manual_seed(seed)
    return TinyNet()
