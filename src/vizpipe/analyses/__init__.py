"""The four analyses as plain PyTorch functions: no Hydra, MLflow or h5py here.

Each takes a model (and, where needed, evaluation batches and a loss function)
and returns a result dataclass of tensors and metadata.
"""

from vizpipe.analyses.activation_maximization import (
    ActivationMaximizationResult,
    activation_maximization,
)
from vizpipe.analyses.conv_kernels import ConvKernelsResult, conv_kernels, kernel_grid
from vizpipe.analyses.hessian import HessianResult, hessian_block_eigenvalues
from vizpipe.analyses.hessian_spectrum import (
    SpectralDensity,
    TopEigenvalues,
    TraceEstimate,
    eigenvector_directions,
    hessian_density,
    hessian_top_eigenvalues,
    hessian_trace,
)
from vizpipe.analyses.landscape import LandscapeResult, loss_landscape, random_direction

__all__ = [
    "ActivationMaximizationResult",
    "ConvKernelsResult",
    "HessianResult",
    "LandscapeResult",
    "SpectralDensity",
    "TopEigenvalues",
    "TraceEstimate",
    "activation_maximization",
    "conv_kernels",
    "eigenvector_directions",
    "hessian_block_eigenvalues",
    "hessian_density",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "kernel_grid",
    "loss_landscape",
    "random_direction",
]
