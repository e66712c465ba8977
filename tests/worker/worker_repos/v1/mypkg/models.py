import oneflow as flow
import oneflow.nn as nn

import mypkg

WIDTH = 10


class SmallCNN(nn.Module):
    def __init__(self, width=WIDTH):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, width)
        self.version = mypkg.VERSION

    def forward(self, x):
        return self.fc(flow.relu(self.bn(self.conv(x))).mean((2, 3)))
