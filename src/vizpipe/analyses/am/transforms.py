"""Image regularizers and random transforms for activation maximization.

Penalties (``total_variation``, ``l2_penalty``) are added to the loss. Random
transforms (``random_affine``) act on the image before each forward pass, so
the result must survive small shifts, scalings and rotations. In-place
operations (``gaussian_blur_``, ``norm_crop_``, ``contribution_crop_``,
``project_l2_``) change the optimized pixel tensor itself between steps, so the
optimizer keeps updating the same tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image: mean absolute difference of neighbouring pixels."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(dim=1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(dim=1)
    return dx + dy


def l2_penalty(inputs: torch.Tensor) -> torch.Tensor:
    """Mean squared value per image of the normalized model input (0 is the dataset mean)."""
    return inputs.pow(2).flatten(1).mean(dim=1)


def gaussian_kernel(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Return the normalized 1D Gaussian of standard deviation ``sigma`` pixels, radius ``ceil(truncate * sigma)``."""
    radius = max(1, math.ceil(truncate * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Blur [B, C, H, W] images with a separable Gaussian of ``sigma`` pixels, mirrored at the border.

    Equals ``scipy.ndimage.gaussian_filter(image, (0, sigma, sigma), mode="mirror",
    truncate=truncate)`` per image while the radius is smaller than the image.
    """
    if sigma <= 0:
        return images
    channels = images.shape[1]
    kernel = gaussian_kernel(sigma, truncate).to(device=images.device, dtype=images.dtype)
    radius = (kernel.numel() - 1) // 2
    height, width = images.shape[-2:]
    mode = "reflect" if radius < min(height, width) else "replicate"
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    blurred = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode=mode), horizontal, groups=channels)
    return F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode=mode), vertical, groups=channels)


def gaussian_blur_(pixels: torch.Tensor, sigma: float) -> None:
    """Blur the optimized tensor in place (the classic every-k-steps regularizer)."""
    with torch.no_grad():
        pixels.copy_(gaussian_blur(pixels, sigma))


def _below_percentile(score: torch.Tensor, percentile: float) -> torch.Tensor:
    """Mask [B, H, W] of positions whose ``score`` lies below its image's ``percentile`` (0-100)."""
    threshold = torch.quantile(score.flatten(1), percentile / 100.0, dim=1).view(-1, 1, 1)
    return score < threshold


def norm_crop_(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, percentile: float) -> None:
    """Set pixels whose norm over channels (in normalized units) is below ``percentile`` to the dataset mean.

    Those pixels become 0 in the model input. Works in place on ``pixels`` [B, C, H, W]."""
    with torch.no_grad():
        norm = ((pixels - mean) / std).norm(dim=1)
        mask = _below_percentile(norm, percentile).unsqueeze(1)
        pixels.copy_(torch.where(mask, mean.expand_as(pixels), pixels))


def contribution_crop_(pixels: torch.Tensor, gradient: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                       percentile: float) -> None:
    """Set pixels with a small contribution to the objective to the dataset mean, in place.

    A pixel's contribution is ``|sum over channels of input * gradient|``, the
    first-order change of the objective if the pixel were set to the mean.
    ``gradient`` is the objective's gradient with respect to ``pixels``.
    """
    with torch.no_grad():
        contribution = (((pixels - mean) / std) * gradient * std).sum(dim=1).abs()
        mask = _below_percentile(contribution, percentile).unsqueeze(1)
        pixels.copy_(torch.where(mask, mean.expand_as(pixels), pixels))


def project_l2_(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, radius: float) -> None:
    """Scale each image's normalized input ``(pixels - mean) / std`` onto the L2 sphere of ``radius``, in place."""
    with torch.no_grad():
        inputs = (pixels - mean) / std
        norm = inputs.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        pixels.copy_(inputs * (radius / norm) * std + mean)


def tangent_gradient_(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Remove from ``pixels.grad`` its component along each image's normalized input, in place.

    With the input's norm fixed, only the part of the gradient tangent to the
    sphere moves the image. Adam divides each element by its own scale, so with
    the full gradient a linear objective ends at ``sign(w)`` instead of ``w``
    after projection. The tangent gradient vanishes at the true optimum.
    """
    with torch.no_grad():
        direction = ((pixels - mean) / std).flatten(1)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        gradient = (pixels.grad * std).flatten(1)  # gradient with respect to the normalized input
        gradient -= (gradient * direction).sum(dim=1, keepdim=True) * direction
        pixels.grad.copy_(gradient.view_as(pixels) / std)


def affine_parameters(generator: torch.Generator, count: int, jitter: int, scale: tuple[float, float],
                      rotation: float) -> torch.Tensor:
    """Draw [count, 4] transform parameters: shift x, shift y (pixels), scale, angle (degrees)."""
    uniform = torch.rand(count, 4, generator=generator, dtype=torch.float64)
    shifts = torch.floor(uniform[:, :2] * (2 * jitter + 1)) - jitter
    scales = scale[0] + uniform[:, 2:3] * (scale[1] - scale[0])
    angles = (2 * uniform[:, 3:4] - 1) * rotation
    return torch.cat([shifts, scales, angles], dim=1)


def random_affine(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """Shift, scale and rotate each image by its row of ``parameters`` (see ``affine_parameters``).

    Bilinear resampling with mirrored borders; integer shifts without scale or
    rotation move pixels exactly. Differentiable with respect to ``images``.
    """
    batch, _, height, width = images.shape
    parameters = parameters.to(device=images.device, dtype=images.dtype)
    shift_x, shift_y, scale, angle = parameters.unbind(dim=1)
    radians = angle * (math.pi / 180.0)
    cos, sin = torch.cos(radians) / scale, torch.sin(radians) / scale
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
    theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    theta[:, 0, 2] = -2.0 * shift_x / width
    theta[:, 1, 2] = -2.0 * shift_y / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
