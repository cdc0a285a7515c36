"""Built-in architectures that ``safetensors`` and ``state_dict`` weight files load into.

The service imports this module to rebuild a network from a weights-only file (no pickled
code), so it needs nothing but torch. Each class has a no-argument constructor; the weight
file's tensors must match its ``state_dict`` exactly (``load_state_dict(strict=True)``).
"""

from __future__ import annotations

import torch
from torch import nn

DIGITS_SIDE = 8
DIGITS_CLASSES = 10


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 grey digit images (scikit-learn's ``load_digits``).

    Input: a uint8 tensor ``(batch, 8, 8)`` of pixel values 0..255. Output: float32 logits
    ``(batch, 10)``, one per digit. Two 3x3 convolutions, a 2x2 max-pool, one linear layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        pooled = DIGITS_SIDE // 2
        self.out = nn.Linear(32 * pooled * pooled, DIGITS_CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of uint8 images ``(batch, 8, 8)``."""
        x = image.to(torch.float32).div(255.0).unsqueeze(1)
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.out(x.flatten(1))
