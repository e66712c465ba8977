"""A small torchvision-style model in torch-style code: written with real torch by the fixture script,
rebuilt on OneFlow through ``mock_torch`` by the loopback repo's hubconf (which ships this file)."""
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(8 * 4 * 4, 160)  # 80 KiB of weights: large enough to travel by reference
        self.head = nn.Linear(160, num_classes)

    def forward(self, x):
        return self.head(self.fc(self.features(x).flatten(1)).relu())
