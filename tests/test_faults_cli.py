"""Faults around a job through the real CLI: a locked run folder, foreign results files, hostile names."""

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from conftest import run_cli  # noqa: E402
from test_cli import assert_clean_error  # noqa: E402

from vizpipe import store  # noqa: E402
from vizpipe.render.common import safe_name, save  # noqa: E402


def test_second_job_on_locked_folder(tmp_path):
    run_dir = tmp_path / "run"
    with store.FileLock(run_dir / "results.h5"):  # the lock a running job holds
        completed = run_cli([f"hydra.run.dir={run_dir}", "tracking.enabled=false", "weights.source=random",
                             "analysis=[conv_kernels]", "dataset.image_shape=[1,8,8]"], cwd=tmp_path)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert_clean_error(completed, f"another vizpipe job is writing {run_dir}",
                       "wait for it to finish or use another run folder")
    assert not (run_dir / "results.h5").exists()


def test_figures_reject_foreign_results_file(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = [1, 2]
    completed = run_cli([f"source={foreign}", f"out_dir={tmp_path / 'figures'}"], cwd=tmp_path,
                        entry="vizpipe-figures")
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert_clean_error(completed, f"{foreign} is not a vizpipe results file", "no schema_version attribute")


def test_hostile_layer_name_stays_in_folder(tmp_path):
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert safe_name("..") == "unnamed"
    out_dir = tmp_path / "figures"
    out_dir.mkdir()
    figure = plt.figure()
    paths = save(figure, out_dir, "conv_kernels_../../escaped", ["png"])
    assert [path.parent for path in paths] == [out_dir]
    assert not list(tmp_path.glob("escaped*"))
