"""The project's data: scikit-learn's 8x8 digits as images, randomly shifted by a pixel when training."""

import torch
from torch.utils.data import Dataset

from hpcml.compute.datasets import digits


class ShiftedDigits(Dataset):
    def __init__(self, split: str = "train", max_shift: int = 1):
        images, self.labels = digits(split).tensors
        self.images = images.reshape(-1, 1, 8, 8)
        self.max_shift = max_shift

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.max_shift:
            # Augmentation from torch's random stream: hpcml seeds it per (step, sample), so a resumed run
            # and a run on more ranks draw the same shifts.
            dx, dy = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        return image, self.labels[i]
