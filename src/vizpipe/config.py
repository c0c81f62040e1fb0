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
    save_every_epoch: bool = False  # also write checkpoints/epoch_NNN.pt after each epoch (a trajectory for PCA)


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
    dims: int = 2  # 1: a line, 2: a plane
    direction: str = "random"  # random | target | pca | hessian (top eigenvectors of the whole Hessian)
    noise_range: Any = 1.0  # x coordinates: r for [-r, r], or [min, max]
    y_range: Any = None  # y coordinates (2D); None: same as noise_range
    resolution: int = 21  # points per axis
    normalization: str = "filter"  # random directions: filter | layer | none
    ignore: str = "biasbn"  # biasbn | none
    include_buffers: Optional[bool] = None  # move BatchNorm statistics; None: only for target directions
    targets: Optional[List[str]] = None  # direction=target: 1 or 2 state_dict files
    trajectory: Optional[List[str]] = None  # direction=pca: state_dict files or glob patterns, in training order
    directions_from: Optional[str] = None  # reuse the directions stored in another results.h5 (or its run folder)
    compile: Optional[bool] = None  # torch.compile the forward pass; None: when the grid is large
    channels_last: Optional[bool] = None  # channels-last inputs and weights; None: on CPU for conv models
    max_samples: Optional[int] = None  # evaluation samples used per grid point
    summary_radius: Optional[float] = None  # radius of the loss-increase metrics; None: a quarter of max |x|
    log_scale: bool = False  # rendering: plot log(loss)
    max_val: Optional[float] = None  # rendering: cap the colour scale (stored values stay raw)


@dataclass
class HessianConfig:
    blocks: bool = True  # dominant eigenvalue of each block's own Hessian
    method: str = "power_iteration"  # power_iteration | lanczos
    max_iterations: int = 100  # Hessian-vector products per block at most (per phase for power_iteration extremes)
    tol: float = 1e-4  # relative change of the estimate that stops a block
    verify: bool = False  # also run every block from an independent random start (twice the products)
    group_by: str = "parameter"  # parameter | module
    curvature: str = "hessian"  # hessian | ggn (generalized Gauss-Newton, positive semi-definite)
    which: str = "magnitude"  # magnitude | extremes (also the largest and smallest algebraic eigenvalues)
    include: Optional[List[str]] = None  # fnmatch patterns on parameter names; None: every trainable parameter
    exclude: Optional[List[str]] = None  # fnmatch patterns removed from the selection
    max_samples: Optional[int] = None
    top_k: int = 0  # top eigenvalues of the whole Hessian; 0: off
    top_k_method: str = "lanczos"  # lanczos (largest algebraic) | power_iteration (largest magnitude, deflation)
    top_k_max_iterations: int = 100  # products in all (lanczos) or per eigenpair (power_iteration)
    top_k_tol: float = 1e-6
    eigenvectors: bool = False  # store the top-k eigenvectors (top_k x parameter count float64 values)
    trace: bool = False  # Hutchinson trace with Rademacher probes
    trace_max_probes: int = 100
    trace_min_probes: int = 10
    trace_relative_standard_error: float = 0.01  # stop once standard error <= this * |trace|
    density: bool = False  # eigenvalue density by stochastic Lanczos quadrature
    density_runs: int = 3
    density_steps: int = 80  # Lanczos steps (Gauss nodes) per run
    density_sigma: float = 0.01  # Gaussian width, relative to the span of the nodes
    density_grid_points: int = 1000


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


# Analyses in the order a job runs them, and the order run names list them.
ANALYSIS_ORDER = ("conv_kernels", "landscape", "hessian", "activation_maximization")


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
    # Longer param values are cut, ending in a hash of the full value; 500 for MLflow servers before 2.8.
    max_param_length: int = 6000


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
    overwrite: bool = False  # replace a results.h5 of another config in the run folder instead of failing


@dataclass
class FigureSelectConfig:
    """Which jobs a paper figure shows: a multirun folder, or an MLflow query."""

    runs_folder: Optional[str] = None  # multirun folder: its <job number>/results.h5 files, in job order
    jobs: Optional[List[int]] = None  # runs_folder: only these job numbers, in this order
    # runs_folder: only jobs whose stored config has these values, e.g. {analysis.landscape.noise_range: 0.1}
    # Typed Any so that a command-line dict replaces the None: Hydra merges a dict into
    # a Dict node, which struct mode rejects, and cannot merge into a None Dict node.
    where: Any = None
    experiment_name: Optional[str] = None  # MLflow experiment to search instead of a folder
    filter_string: str = ""  # MLflow search filter, e.g. "params.seed = '0'"
    order_by: List[str] = field(default_factory=lambda: ["attributes.start_time ASC"])
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db
    max_runs: int = 12


@dataclass
class FigureSpecConfig:
    """A paper figure: what it shows (``kind``), from which jobs, labelled by which config key."""

    kind: str = MISSING  # landscapes | eigenvalues | activation_maximization | kernels
    name: str = MISSING  # file stem of the figure
    title: Optional[str] = None
    select: FigureSelectConfig = field(default_factory=FigureSelectConfig)
    # Config key whose value labels each job, e.g. analysis.landscape.noise_range; None: the
    # overrides that differ between the selected jobs, e.g. model=mlp.
    label: Optional[str] = None
    layers: Optional[List[str]] = None  # activation_maximization, kernels: None for every layer of the first job
    max_channels: int = 16  # activation_maximization: channels shown per panel
    log_scale: bool = False  # landscapes: plot log10(loss)
    max_val: Optional[float] = None  # landscapes: cap the loss before plotting


@dataclass
class PrintStyleConfig:
    """matplotlib settings for print: sizes in points and inches, colorblind-safe colormaps."""

    font_size: float = 8.0
    title_size: float = 9.0
    font_family: str = "DejaVu Sans"
    width: float = 7.0  # inches; 7 fits a two-column paper page, 3.4 one column
    panel_height: float = 2.4  # inches per row of panels
    dpi: int = 300  # PNG resolution; PDF and SVG stay vector except image panels
    cmap: str = "viridis"  # landscapes; viridis, cividis and magma are colorblind-safe


@dataclass
class FiguresTrackingConfig:
    enabled: bool = True  # log the paper figures to an MLflow "figures" run
    tracking_uri: Optional[str] = None  # None: figure.select.tracking_uri, else as for jobs
    experiment_name: str = "vizpipe-figures"


@dataclass
class RenderConfig:
    """Config of ``vizpipe-figures``."""

    source: Optional[str] = None  # results.h5 or a run folder containing it; or use figure=<spec>
    figure: Optional[FigureSpecConfig] = None  # a paper figure spec from conf/figure/
    out_dir: Optional[str] = None  # default: <run folder>/figures; for a figure spec, outputs/figures
    formats: List[str] = field(default_factory=lambda: ["png", "pdf"])
    log_scale: Optional[bool] = None  # landscape; None: as stored in the results file
    max_val: Optional[float] = None  # landscape colour cap
    kernel_normalize: Optional[str] = None  # tile | grid; None: as stored
    hessian_symlog: Optional[bool] = None  # symmetric-log eigenvalue axis; None: when values span > 2 decades
    style: PrintStyleConfig = field(default_factory=PrintStyleConfig)
    tracking: FiguresTrackingConfig = field(default_factory=FiguresTrackingConfig)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="vizpipe_schema", node=VizpipeConfig)
    store.store(name="render_schema", node=RenderConfig)
