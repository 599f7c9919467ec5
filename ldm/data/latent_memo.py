"""An in-memory memo of the frozen autoencoder's posterior, keyed by the image's bytes.

A procedural set such as :mod:`ldm.data.shapes` draws the same few thousand images again and again under
different captions (the demo's 48,000 draws hold about 200 distinct single-object images), and the frozen
encoder is ~40% of the demo's training step. The memo encodes each distinct image once and keeps its posterior
moments ``mean, std [C, h, w]``; a training step then samples ``z = mean + std * eps`` from them as the encoder's
posterior would (:func:`ldm.models.diffusion_trainer.posterior_latents`). Unlike the on-disk latent cache
(:mod:`ldm.data.latent_cache`) it needs no preparation, holds no captions, and follows any augmentation (a flipped
image is another key).

Every miss is encoded alone (batch 1), never with the rest of its batch: oneDNN's results can differ in the last bit
with the batch they are computed in, and a memo filled in a different order (a resumed run starts empty) must
still give the same moments, so that a resumed run continues bit for bit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import torch


def image_key(image: torch.Tensor) -> bytes:
    """A 16-byte digest of one image's dtype, shape and values (BLAKE2b)."""
    data = image.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.digest()


class LatentMemo:
    """Least-recently-used memo ``image bytes -> (mean, std)`` of at most ``max_entries`` images.

    ``memo(images, encode)`` with ``images [B, 3, H, W]`` and ``encode(x [1, 3, H, W]) -> posterior`` (anything
    with ``.mean`` and ``.std`` ``[1, C, h, w]``, e.g. ``AutoencoderKL.encode``) returns ``(mean, std)``
    ``[B, C, h, w]``. An entry costs ``2 * C * h * w`` values (8 KiB for the demo's 4x16x16 float32 latents).
    ``hits`` / ``misses`` count lookups since construction.
    """

    def __init__(self, max_entries: int):
        if int(max_entries) < 1:
            raise ValueError(f"latent memo: max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, encode: Callable[[torch.Tensor], object]) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f"latent memo: expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        means, stds = [], []
        on_host = images.detach().cpu()  # one copy per batch for the keys, not one per image
        for image, host_image in zip(images, on_host):
            key = image_key(host_image)
            entry = self._entries.get(key)
            if entry is None:
                posterior = encode(image.unsqueeze(0))
                entry = (posterior.mean[0].detach(), posterior.std[0].detach())
                self._entries[key] = entry
                if len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
            means.append(entry[0])
            stds.append(entry[1])
        return torch.stack(means), torch.stack(stds)
