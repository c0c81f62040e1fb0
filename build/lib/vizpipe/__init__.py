"""vizpipe: loss landscapes, Hessian spectra, activation maximization and
convolution-kernel grids for trained PyTorch models."""

__version__ = "0.1.0"

from vizpipe.errors import VizpipeError

__all__ = ["VizpipeError", "__version__"]
