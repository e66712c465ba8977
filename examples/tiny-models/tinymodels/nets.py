"""Model definitions of the example hub (version 0.1)."""
import oneflow as flow
import oneflow.nn as nn

VERSION = "0.1"


class TinyNet(nn.Module):
    """A small convolutional classifier for 3x32x32 images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(flow.flatten(self.features(x), 1))


class TinyMLP(nn.Module):
    """A two-layer perceptron on 64 features."""

    def __init__(self, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(flow.relu(self.fc1(x)))
