"""``Views``: a batch of studies' images as the encoder reads them.

Born in ``mrg.data.study.batch_tensors`` (or ``Collate``), read by ``VisualEncoder.forward``;
everything between passes the one value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VIEW_IDS = {"frontal": 0, "lateral": 1, "unknown": 2}  # a view's position → its id


@dataclass(frozen=True)
class Views:
    """``images [B, V, 1, H, W]`` greyscale in [0, 1] (zeros where a view is missing),
    ``ids [B, V]`` (0 frontal, 1 lateral, 2 unknown), ``mask [B, V]`` (False: missing)."""

    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> Views:
        return Views(self.images.to(device), self.ids.to(device), self.mask.to(device))

    def __getitem__(self, rows: slice) -> Views:
        """The studies ``rows``."""
        return Views(self.images[rows], self.ids[rows], self.mask[rows])

    def repeat(self, times: int) -> Views:
        """The studies ``times`` over: ``[B·times, …]`` (one study written from many conditions)."""
        return Views(
            self.images.repeat(times, 1, 1, 1, 1),
            self.ids.repeat(times, 1),
            self.mask.repeat(times, 1),
        )
