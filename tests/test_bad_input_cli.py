"""Bad input through the real CLI: one error line that names the bad value and the fix, exit 2,
no traceback, and nothing computed or written to results.h5.

Cases already covered in test_cli.py (unknown layer for activation maximization, channel out
of range, missing CIFAR folder, checkpoint with wrong keys or pickled code) are not repeated.
"""

import pytest
import torch
from conftest import run_cli
from test_cli import assert_clean_error
from test_data import write_batch

from vizpipe.models import SmallCNN

COMMON = ["tracking.enabled=false", "figures.enabled=false", "progress=false", "dataset.image_shape=[1,8,8]"]
RANDOM = "weights.source=random"
NAN_DATASET = '''
from vizpipe.data import synthetic


def nan_dataset(**options):
    data = synthetic(**options)
    data.x_test[5, 0, 1, 2] = float("nan")
    return data
'''


def checkpoint(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return ["weights.source=checkpoint", f"weights.checkpoint={path}", "analysis=[conv_kernels]"], path


def cifar_folder(tmp_path, skip=(), truncate=()):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name in skip:
            continue
        write_batch(folder / name, 4)
        if name in truncate:
            (folder / name).write_bytes((folder / name).read_bytes()[:300])
    return folder


def unknown_conv_kernels_layer(tmp_path):
    args = [RANDOM, "analysis=[conv_kernels]", "analysis.conv_kernels.layers=[conv3]"]
    return args, ["unknown layer 'conv3' for conv kernels", "Closest valid names: conv2, conv1.",
                  "Fix analysis.conv_kernels.layers"]


def non_convolution_layer(tmp_path):
    args = [RANDOM, "analysis=[conv_kernels]", "analysis.conv_kernels.layers=[fc1]"]
    return args, ["layer 'fc1' for conv kernels is a Linear, expected Conv2d", "Closest valid names: conv1.",
                  "Fix analysis.conv_kernels.layers"]


def resolution_zero(tmp_path):
    args = [RANDOM, "analysis=[landscape]", "analysis.landscape.resolution=0"]
    return args, ["invalid analysis.landscape.resolution 0: it must be at least 1"]


def noise_range_reversed(tmp_path):
    args = [RANDOM, "analysis=[landscape]", "analysis.landscape.noise_range=[1,-1]"]
    return args, ["invalid analysis.landscape.noise_range [1, -1]", "the minimum 1 must be below the maximum -1"]


def y_range_empty(tmp_path):
    args = [RANDOM, "analysis=[landscape]", "analysis.landscape.y_range=[0.5,0.5]"]
    return args, ["invalid analysis.landscape.y_range [0.5, 0.5]", "the minimum 0.5 must be below the maximum 0.5"]


def hessian_iterations_zero(tmp_path):
    args = [RANDOM, "analysis=[hessian]", "analysis.hessian.max_iterations=0"]
    return args, ["invalid analysis.hessian.max_iterations 0: it must be at least 1"]


def hessian_selection_empty(tmp_path):
    args = [RANDOM, "analysis=[hessian]", "analysis.hessian.exclude=[*]"]
    return args, ["no trainable parameter selected for the Hessian", "check hessian.include and hessian.exclude"]


def am_iterations_zero(tmp_path):
    args = [RANDOM, "analysis=[activation_maximization]", "analysis.activation_maximization.iterations=0"]
    return args, ["invalid analysis.activation_maximization.iterations 0: it must be at least 1"]


def checkpoint_missing(tmp_path):
    path = tmp_path / "absent.pt"
    args = ["weights.source=checkpoint", f"weights.checkpoint={path}", "analysis=[conv_kernels]"]
    return args, [f"checkpoint not found: {path}", "give the path of an existing state_dict file"]


def checkpoint_truncated(tmp_path):
    saved = tmp_path / "full.pt"
    torch.save(SmallCNN(input_channel=1, class_number=10).state_dict(), saved)
    args, path = checkpoint(tmp_path, "truncated.pt", saved.read_bytes()[: saved.stat().st_size // 2])
    return args, [f"checkpoint {path} is not a PyTorch file", "it may be truncated",
                  "Save it with torch.save(model.state_dict(), path)"]


def checkpoint_not_a_state_dict(tmp_path):
    args, path = checkpoint(tmp_path, "settings.pt", {"lr": 0.1, "epoch": 3})
    return args, [f"checkpoint {path} is not a state_dict (a dict of tensors)",
                  "save it with torch.save(model.state_dict(), path)"]


def checkpoint_wrong_shapes(tmp_path):
    args, path = checkpoint(tmp_path, "five_classes.pt", SmallCNN(input_channel=1, class_number=5).state_dict())
    return args, [f"checkpoint {path} does not fit SmallCNN", "shape mismatch: fc2.weight [5, 64] vs model [10, 64]",
                  "check that the model config matches the checkpoint"]


def cifar_batch_missing(tmp_path):
    folder = cifar_folder(tmp_path, skip=("data_batch_2",))
    args = [RANDOM, "dataset=cifar10", f"dataset.data_path={folder.parent}", "analysis=[conv_kernels]"]
    return args, [f"CIFAR-10 folder {folder} is incomplete: missing data_batch_2",
                  "expected the python-version files of cifar-10-batches-py/"]


def cifar_batch_corrupt(tmp_path):
    folder = cifar_folder(tmp_path, truncate=("data_batch_3",))
    args = [RANDOM, "dataset=cifar10", f"dataset.data_path={folder.parent}", "analysis=[conv_kernels]"]
    return args, [f"corrupt CIFAR batch file {folder / 'data_batch_3'}", "download the dataset again"]


def image_shape_rejected(tmp_path):
    args = [RANDOM, "model=mlp", "model.input_shape=[1,16,16]", "analysis=[landscape]"]
    return args, ["MLP rejects images of shape [1, 8, 8]", "change dataset.image_shape or the model config"]


def output_does_not_fit_loss(tmp_path):
    args = [RANDOM, "model=mlp", "model.class_number=3", "analysis=[landscape]"]
    return args, ["model output of shape [3] per sample does not fit the loss CrossEntropyLoss with labels up to 9",
                  "set model.class_number to 10"]


def nan_in_inputs(tmp_path):
    (tmp_path / "nan_data.py").write_text(NAN_DATASET)
    args = [RANDOM, "model=mlp", "dataset=synthetic", "dataset._target_=nan_data.nan_dataset", "analysis=[landscape]"]
    return args, ["dataset synthetic: 1 test image(s) contain NaN or infinite values (first at index 5)",
                  "clean the data"]


CASES = [
    unknown_conv_kernels_layer, non_convolution_layer, resolution_zero, noise_range_reversed, y_range_empty,
    hessian_iterations_zero, hessian_selection_empty, am_iterations_zero, checkpoint_missing, checkpoint_truncated,
    checkpoint_not_a_state_dict, checkpoint_wrong_shapes, cifar_batch_missing, cifar_batch_corrupt,
    image_shape_rejected, output_does_not_fit_loss, nan_in_inputs,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_rejected_before_work(tmp_path, case):
    args, fragments = case(tmp_path)
    run_dir = tmp_path / "run"
    completed = run_cli([f"hydra.run.dir={run_dir}", *COMMON, *args], cwd=tmp_path,
                        env_extra={"PYTHONPATH": str(tmp_path)})
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert_clean_error(completed, *fragments)
    assert not (run_dir / "results.h5").exists(), "the check must come before results.h5 is written"
    assert not (run_dir / "checkpoint.pt").exists(), "the check must come before training"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    completed = run_cli([f"hydra.run.dir={tmp_path}/run", *COMMON, RANDOM, "analysis=[conv_kernels]", "device=cuda"],
                        cwd=tmp_path)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert_clean_error(completed, "device=cuda requested but CUDA is not available here",
                       "use device=cpu or device=auto")
