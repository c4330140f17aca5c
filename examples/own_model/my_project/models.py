"""The project's network: a small convolutional net for 8x8 images, with BatchNorm."""

from torch import nn


class SmallConvNet(nn.Module):
    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(channels * 4 * 4, num_classes)

    def forward(self, images):
        return self.head(self.features(images).flatten(1))
