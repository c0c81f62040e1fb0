"""A job that runs out of disk space: a clear error, an intact results file, and a resume.

The child process gets a file-size limit (RLIMIT_FSIZE) with SIGXFSZ ignored,
so a write past the limit fails with EFBIG, as a write to a full disk fails
with ENOSPC. Both take the same path through vizpipe.
"""

import resource
import signal

import numpy as np
from conftest import run_cli

from vizpipe import store

# About 50 kB of results once conv kernels are written; the landscape's two
# directions then add about 310 kB, far past the limit.
FILE_SIZE_LIMIT = 250_000
JOB = [
    "weights.source=random",
    "dataset.image_shape=[1,8,8]",
    "evaluation.max_samples=50",
    "analysis=[conv_kernels,landscape]",
    "analysis.landscape.resolution=3",
    "tracking.enabled=false",
    "figures.formats=[png]",
    "progress=false",
]


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_disk_full_keeps_finished_analyses(tmp_path):
    run_dir = tmp_path / "run"
    full = run_cli([f"hydra.run.dir={run_dir}", *JOB], cwd=tmp_path, preexec_fn=limit_file_size)

    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("vizpipe: error:")]
    assert len(errors) == 1, full.stderr
    assert f"writing {run_dir / 'results.h5'} failed: File too large" in errors[0]
    assert f"free disk space and rerun the same command with hydra.run.dir={run_dir}" in errors[0]
    assert "finished analyses are kept" in errors[0]
    assert not (run_dir / "results.h5.writing").exists()

    results = store.read_results(run_dir / "results.h5")
    assert results.group_attrs["conv_kernels"]["complete"] is True
    assert results["conv_kernels"]["conv1"]["weight"].shape == (16, 1, 3, 3)
    assert results["conv_kernels"]["conv2"]["weight"].shape == (32, 16, 3, 3)
    assert "landscape" not in results

    figures = run_cli([f"source={run_dir}", f"out_dir={tmp_path / 'figures'}", "formats=[png]"],
                      cwd=tmp_path, entry="vizpipe-figures")
    assert figures.returncode == 0, figures.stderr[-3000:]
    assert (tmp_path / "figures" / "conv_kernels_conv2.png").stat().st_size > 1000

    resumed = run_cli([f"hydra.run.dir={run_dir}", *JOB], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping conv_kernels" in resumed.stdout + resumed.stderr
    results_after = store.read_results(run_dir / "results.h5")
    np.testing.assert_array_equal(
        results_after["conv_kernels"]["conv2"]["weight"], results["conv_kernels"]["conv2"]["weight"]
    )
    assert results_after.group_attrs["landscape"]["complete"] is True
    assert results_after["landscape"]["done"].all()
    assert np.isfinite(results_after["landscape"]["loss"]).all()
