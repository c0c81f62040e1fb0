"""Structured-config schema, registered in Hydra's ConfigStore as ``vizpipe_schema``.

Hydra merges the YAML files under ``conf/`` into these dataclasses, so a wrong
type or an unknown key fails before any work starts. ``model``, ``dataset`` and
``loss`` are plug-in points (any ``_target_`` with its own keyword arguments);
their keys are checked when they are instantiated. Value ranges that types
cannot express are checked by ``vizpipe.runner.validate`` before the model is
built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# NOTE: these annotations use typing.List/Optional because OmegaConf 2.3 reads
# them at run time and does not accept PEP 604 unions on Python 3.10.


@dataclass
class WeightsConfig:
    source: str = "train"  # random | checkpoint | train
    checkpoint: Optional[str] = None  # state_dict file for source=checkpoint
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    save_checkpoint: bool = True  # write checkpoint.pt into the run folder after training


@dataclass
class EvaluationConfig:
    split: str = "test"  # train | test
    max_samples: Optional[int] = None  # first N samples of the split; None for all
    batch_size: int = 256


@dataclass
class ConvKernelsConfig:
    layers: Optional[List[str]] = None  # None: every Conv2d layer
    normalize: str = "tile"  # tile | grid


@dataclass
class LandscapeConfig:
    noise_range: Any = 1.0  # r for [-r, r], or [min, max]
    resolution: int = 21  # points per axis
    normalization: str = "filter"  # filter | layer | none
    ignore: str = "biasbn"  # biasbn | none
    max_samples: Optional[int] = None  # evaluation samples used per grid point
    log_scale: bool = False  # rendering: plot log(loss)
    max_val: Optional[float] = None  # rendering: cap the colour scale (stored values stay raw)


@dataclass
class HessianConfig:
    method: str = "power_iteration"  # power_iteration | lanczos
    max_iterations: int = 100  # Hessian-vector products per block at most
    tol: float = 1e-4  # relative change of the estimate that stops a block
    include: Optional[List[str]] = None  # parameter names; None: every trainable parameter
    max_samples: Optional[int] = None


@dataclass
class ActivationMaximizationConfig:
    layers: Any = "all_conv"  # all_conv (every Conv2d layer; also null) or a list of module names
    channels: Any = "all"  # all, an int, a list of ints, or a range "start:stop[:step]"
    iterations: int = 200
    lr: float = 0.05
    objective: str = "channel"  # channel (mean over positions) | neuron (one position)
    position: Optional[List[int]] = None  # neuron objective: (row, column) in the layer output; None: center
    negative: bool = False  # minimize instead of maximize
    images_per_channel: int = 1
    diversity_weight: float = 0.0  # penalty on Gram-matrix similarity between a channel's images
    parameterization: str = "pixel"  # pixel | fourier
    decorrelate: bool = True  # fourier: mix colours by the training images' channel correlation
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    weight_decay: float = 0.0
    blur_every: int = 0  # pixel: Gaussian blur in place every N steps (0: off)
    blur_sigma: float = 1.0  # pixels
    jitter: int = 0  # random shift of up to N pixels before each forward pass
    scale: List[float] = field(default_factory=lambda: [1.0, 1.0])  # random scale factor range
    rotation: float = 0.0  # random rotation of up to this many degrees either way
    norm_crop: float = 0.0  # pixel: percentile of low-norm pixels set to the mean every step
    contribution_crop: float = 0.0  # pixel: percentile of low-contribution pixels set to the mean every step
    norm_constraint: Optional[float] = None  # pixel: L2 norm of each normalized input after every step
    init_std: Optional[float] = None  # None: 0.1 for pixel, 0.01 for fourier
    clamp: bool = True
    frame_every: int = 10
    batch_size: int = 64  # images optimized together
    compile: bool = False  # torch.compile the model cut at the layer


@dataclass
class AnalysesConfig:
    """Selected analyses; a ``None`` entry is not run."""

    conv_kernels: Optional[ConvKernelsConfig] = None
    landscape: Optional[LandscapeConfig] = None
    hessian: Optional[HessianConfig] = None
    activation_maximization: Optional[ActivationMaximizationConfig] = None


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<output_root>/mlflow.db
    experiment_name: str = "vizpipe"
    run_name: Optional[str] = None


@dataclass
class FiguresConfig:
    enabled: bool = True  # render figures at the end of the job
    formats: List[str] = field(default_factory=lambda: ["png", "pdf"])


@dataclass
class VizpipeConfig:
    model: Any = MISSING
    dataset: Any = MISSING
    loss: Any = field(default_factory=lambda: {"_target_": "torch.nn.CrossEntropyLoss"})
    analysis: AnalysesConfig = field(default_factory=AnalysesConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # tqdm progress bars (also off when stderr is not a terminal)
    output_root: str = "outputs"


@dataclass
class RenderConfig:
    """Config of ``vizpipe-figures``."""

    source: str = MISSING  # results.h5 or a run folder containing it
    out_dir: Optional[str] = None  # default: <run folder>/figures
    formats: List[str] = field(default_factory=lambda: ["png", "pdf"])
    log_scale: Optional[bool] = None  # landscape; None: as stored in the results file
    max_val: Optional[float] = None  # landscape colour cap
    kernel_normalize: Optional[str] = None  # tile | grid; None: as stored


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="vizpipe_schema", node=VizpipeConfig)
    store.store(name="render_schema", node=RenderConfig)
