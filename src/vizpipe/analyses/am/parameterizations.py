"""How the optimized images are parameterized: pixels, or a scaled Fourier spectrum
with decorrelated colour (Olah et al. 2017, "Feature Visualization").

Every parameterization starts image ``i`` from a generator seeded by its own
``image_seeds[i]``, so an image starts the same whichever others share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

PARAMETERIZATIONS = ("pixel", "fourier")


def _seeded_randn(shape: Sequence[int], image_seeds: Sequence[int], std: float) -> torch.Tensor:
    samples = []
    for image_seed in image_seeds:
        generator = torch.Generator().manual_seed(int(image_seed))
        samples.append(std * torch.randn(tuple(shape), generator=generator))
    return torch.stack(samples)


class PixelImage:
    """Images as raw pixels in [0, 1], starting from ``0.5 + init_std * N(0, 1)``."""

    def __init__(self, image_shape: Sequence[int], image_seeds: Sequence[int], init_std: float, clamp: bool,
                 device, dtype):
        self.clamp = clamp
        start = 0.5 + _seeded_randn(image_shape, image_seeds, init_std)
        if clamp:
            start.clamp_(0.0, 1.0)
        self.tensor = start.to(device=device, dtype=dtype).requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.tensor]

    def pixels(self) -> torch.Tensor:
        return self.tensor

    def after_step(self) -> None:
        """Clamp to [0, 1] in place, so the optimizer keeps updating the same tensor."""
        if self.clamp:
            with torch.no_grad():
                self.tensor.clamp_(0.0, 1.0)


def color_correlation_sqrt(pixels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Return [C, C]: the symmetric square root of the channel covariance of ``pixels`` [N, C, H, W].

    Its columns are scaled so the largest has norm 1. Multiplying independent
    per-channel noise by it gives noise with the data's colour correlations;
    for grayscale images repeated to three channels the result is rank one, so
    every image stays gray.
    """
    channels = pixels.shape[1]
    flat = pixels.transpose(0, 1).reshape(channels, -1).double()
    covariance = torch.cov(flat) if flat.shape[1] > 1 else torch.eye(channels, dtype=torch.float64)
    covariance = torch.atleast_2d(covariance)
    values, vectors = torch.linalg.eigh(covariance)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    norm = root.norm(dim=0).max()
    if norm < eps:
        return torch.eye(channels)
    return (root / norm).float()


class FourierImage:
    """Images as a Fourier spectrum scaled by ``1 / frequency``, mapped to pixels by an
    inverse real FFT, a colour-correlation matrix and a sigmoid.

    Low frequencies get larger steps than high ones, so gradient ascent finds
    smooth images without a blur; the sigmoid keeps pixels in (0, 1) without
    clamping. ``color_correlation`` [C, C] (see ``color_correlation_sqrt``)
    mixes the independently optimized channels into correlated colours; None
    leaves them independent.
    """

    def __init__(self, image_shape: Sequence[int], image_seeds: Sequence[int], init_std: float,
                 color_correlation: torch.Tensor | None, device, dtype, decay_power: float = 1.0):
        channels, height, width = (int(v) for v in image_shape)
        self.height, self.width = height, width
        frequency_y = torch.fft.fftfreq(height).view(-1, 1)
        frequency_x = torch.fft.rfftfreq(width).view(1, -1)
        frequency = torch.sqrt(frequency_x**2 + frequency_y**2)
        self.scale = (1.0 / frequency.clamp_min(1.0 / max(height, width)) ** decay_power) * math.sqrt(height * width)
        self.scale = self.scale.to(device=device, dtype=dtype)
        spectrum_shape = (channels, height, width // 2 + 1, 2)
        self.spectrum = _seeded_randn(spectrum_shape, image_seeds, init_std).to(device=device, dtype=dtype)
        self.spectrum.requires_grad_(True)
        if color_correlation is None:
            color_correlation = torch.eye(channels)
        if tuple(color_correlation.shape) != (channels, channels):
            raise ValueError(f"color_correlation must be [{channels}, {channels}], got {list(color_correlation.shape)}")
        self.color_correlation = color_correlation.to(device=device, dtype=dtype)

    def parameters(self) -> list[torch.Tensor]:
        return [self.spectrum]

    def pixels(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        # The inverse FFT divides by H * W (norm="backward"), as tf.signal.irfft2d
        # does in Lucid's fft_image (lucid/optvis/param/spatial.py). With norm="ortho"
        # the sqrt(H * W) in ``scale`` made a 32x32 start image 32 times too
        # contrasted, which saturated the sigmoid so that its gradient vanished.
        image = torch.fft.irfftn(spectrum, s=(self.height, self.width), dim=(-2, -1)) / 4.0
        image = torch.einsum("dc,bchw->bdhw", self.color_correlation, image)
        return torch.sigmoid(image)

    def after_step(self) -> None:
        pass
