"""Figure layout checks on the drawn matplotlib objects, and removal of stale figure files."""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf
from PIL import Image

from vizpipe import store
from vizpipe.config import FigureSpecConfig, PrintStyleConfig
from vizpipe.render import render_results
from vizpipe.render.activation_maximization import render_activation_maximization
from vizpipe.render.figures import MANIFEST
from vizpipe.render.hessian import DISAGREE, hessian_figures
from vizpipe.render.landscape import landscape_figures
from vizpipe.render.paper import Panel, _activation_maximization, _landscapes, print_style

ROUND_MANTISSAS = {1.0, 2.0, 2.5, 5.0}


def landscape_results(trajectory=None, max_val=None) -> store.Results:
    """A 2D landscape whose loss runs from 0.1913 to 21.62, so evenly spaced contour levels are odd numbers."""
    x = np.linspace(-1.0, 1.0, 9)
    y = np.linspace(-1.0, 1.0, 7)
    grid_x, grid_y = np.meshgrid(x, y)
    loss = 0.1913 + 10.7144 * (grid_x**2 + grid_y**2)
    results = store.Results(None)
    results["landscape"] = {"x": x, "y": y, "loss": loss, "accuracy": 1.0 / (1.0 + loss)}
    if trajectory is not None:
        results["landscape"]["trajectory"] = np.asarray(trajectory, dtype=np.float64)
        results["landscape"]["explained_variance_ratio"] = np.array([0.9, 0.1])
    results.group_attrs["landscape"] = {"kind": "random", "normalization": "filter", "log_scale": False,
                                        "max_val": max_val}
    results.attrs["config_yaml"] = "{}"
    return results


def assert_round(ticks):
    """Each tick is a whole multiple of one step of 1, 2, 2.5 or 5 times a power of ten."""
    assert len(ticks) >= 2, ticks
    step = float(np.diff(ticks).min())
    np.testing.assert_allclose(np.diff(ticks), step, rtol=1e-9)
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 9) in ROUND_MANTISSAS, (step, ticks)
    np.testing.assert_allclose(np.asarray(ticks) / step, np.round(np.asarray(ticks) / step), atol=1e-9)


def shown_ticks(colorbar_axis):
    low, high = colorbar_axis.get_ylim()
    return [tick for tick in colorbar_axis.get_yticks() if low - 1e-12 <= tick <= high + 1e-12]


def test_landscape_colorbar_ticks_are_round():
    figure = landscape_figures(landscape_results())["landscape_contour"]
    figure.canvas.draw()
    loss_axis = figure.axes[0]
    (colorbar_axis,) = loss_axis.child_axes
    ticks = shown_ticks(colorbar_axis)
    assert_round(ticks)
    levels = loss_axis.collections[0].levels
    assert not set(np.round(ticks, 6)) & set(np.round(levels, 6)), "ticks should not be the odd contour levels"
    assert levels[0] == pytest.approx(0.1913)
    plt.close(figure)


def test_colorbar_as_tall_as_its_panel():
    figure = landscape_figures(landscape_results())["landscape_contour"]
    figure.canvas.draw()
    loss_axis, accuracy_axis = figure.axes[:2]
    for axis in (loss_axis, accuracy_axis):
        (colorbar_axis,) = axis.child_axes
        panel, bar = axis.get_position(), colorbar_axis.get_position()
        assert bar.height == pytest.approx(panel.height, rel=1e-6)
        assert bar.y0 == pytest.approx(panel.y0, rel=1e-6)
    assert loss_axis.child_axes[0].get_tightbbox().x1 < accuracy_axis.get_tightbbox().x0
    plt.close(figure)


def test_capped_landscape_marks_the_cap():
    figures = landscape_figures(landscape_results(), max_val=5.0)
    contour = figures["landscape_contour"].axes[0].collections[0]
    assert contour.colorbar.extend == "max"
    assert contour.colorbar.ax.get_ylabel() == "loss (capped at 5)"
    heatmap = figures["landscape_heatmap"].axes[0].collections[0]
    assert heatmap.colorbar.extend == "max"
    plt.close("all")

    uncapped = landscape_figures(landscape_results(), max_val=50.0)["landscape_contour"].axes[0].collections[0]
    assert uncapped.colorbar.extend == "neither"
    assert uncapped.colorbar.ax.get_ylabel() == "loss"
    plt.close("all")


def test_trajectory_markers_have_legend():
    trajectory = [[0.8, 0.5], [0.3, 0.2], [0.0, 0.0]]
    figure = landscape_figures(landscape_results(trajectory))["landscape_contour"]
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "training path (one dot per checkpoint)", "start of training", "end of training (centre)",
    ]
    plt.close(figure)

    moved = landscape_figures(landscape_results([[0.8, 0.5], [0.3, 0.2]]))["landscape_heatmap"]
    names = [text.get_text() for text in moved.legends[0].get_texts()]
    assert names == ["training path (one dot per checkpoint)", "start of training", "end of training", "centre"]
    plt.close(moved)

    assert not landscape_figures(landscape_results())["landscape_contour"].legends
    plt.close("all")


def draw_paper_landscapes(width, max_val):
    style = OmegaConf.structured(PrintStyleConfig(width=width))
    spec = OmegaConf.structured(FigureSpecConfig(kind="landscapes", name="x", max_val=max_val))
    panels = [Panel(f"job {index}", landscape_results(), str(index)) for index in range(2)]
    with plt.rc_context(print_style(style)):
        figure, _, _ = _landscapes(panels, spec, style)
        figure.canvas.draw()
    return figure


@pytest.mark.parametrize("width", [3.4, 7.0])
def test_paper_landscapes_colorbar_fits(width):
    figure = draw_paper_landscapes(width, None)
    first, last = figure.axes[:2]
    (colorbar_axis,) = last.child_axes
    assert colorbar_axis.get_position().height == pytest.approx(last.get_position().height, rel=1e-6)
    assert first.get_tightbbox().x1 < last.get_tightbbox(for_layout_only=True).x0, "panels overlap"
    assert first.get_position().width == pytest.approx(last.get_position().width, rel=1e-3)
    assert figure.get_tightbbox().width <= width + 1e-6
    assert_round(shown_ticks(colorbar_axis))
    assert last.collections[0].colorbar.extend == "neither"
    plt.close(figure)

    capped = draw_paper_landscapes(width, 8.0)
    assert capped.axes[1].collections[0].colorbar.extend == "max"
    plt.close(capped)


def hessian_results(eigenvalues, history=None) -> store.Results:
    names = [f"layer{index}.weight" for index in range(len(eigenvalues))]
    if history is None:
        history = np.tile([1.0, 1.5, 1.8, 1.9], (len(names), 1))
    results = store.Results(None)
    results["hessian"] = {"parameter_names": names, "eigenvalues": np.asarray(eigenvalues, dtype=np.float64),
                          "converged": np.ones(len(names), dtype=bool), "history": np.asarray(history)}
    results.group_attrs["hessian"] = {"method": "power_iteration", "group_by": "parameter", "tol": 1e-3}
    return results


def legend_names(axis):
    legend = axis.get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def test_eigenvalue_legend_only_with_negatives():
    figure = hessian_figures(hessian_results([3.0, 0.5, 12.0]))["hessian_eigenvalues"]
    assert "negative" not in legend_names(figure.axes[0])
    plt.close("all")

    figure = hessian_figures(hessian_results([3.0, -0.5, 12.0]))["hessian_eigenvalues"]
    assert legend_names(figure.axes[0]) == ["positive", "negative"]
    plt.close("all")


def test_second_start_marked_and_disagreement_in_title():
    results = hessian_results([3.0, 0.5, 12.0])
    results["hessian"]["eigenvalues_by_start"] = np.array([[3.0, 3.0], [0.3, 0.5], [12.0, 11.0]])
    results["hessian"]["disagree"] = np.array([False, True, False])
    axis = hessian_figures(results)["hessian_eigenvalues"].axes[0]
    agreeing, disagreeing = (collection.get_offsets() for collection in axis.collections)
    np.testing.assert_array_equal(agreeing[:, 0], [3.0, 11.0])
    np.testing.assert_array_equal(disagreeing[:, 0], [0.3])
    assert legend_names(axis) == ["other start", "other start, disagrees"]
    label_colors = [label.get_color() for label in axis.get_yticklabels()]
    assert label_colors[1] == DISAGREE
    assert DISAGREE not in (label_colors[0], label_colors[2])
    assert axis.get_title().endswith("; starts disagree on 1 (names in colour)")
    plt.close("all")

    plain = hessian_figures(hessian_results([3.0, 0.5, 12.0]))["hessian_eigenvalues"].axes[0]
    assert not plain.collections
    assert "disagree" not in plain.get_title()
    plt.close("all")


def test_convergence_legend_outside_axes():
    figure = hessian_figures(hessian_results([1.0, 2.0, 3.0]))["hessian_convergence"]
    figure.canvas.draw()
    axis = figure.axes[0]
    assert legend_names(axis) == ["layer0.weight", "layer1.weight", "layer2.weight", "tol"]
    assert axis.get_legend().get_window_extent().x0 >= axis.get_window_extent().x1
    plt.close("all")


def test_convergence_of_many_blocks_uses_colormap():
    count = 29
    steps = np.arange(1, 12, dtype=np.float64)
    history = np.full((count, len(steps)), np.nan)
    for block in range(count):
        used = 4 + block % 7  # blocks 6, 13, 20 and 27 take the most steps
        history[block, :used] = 1.0 + 1.0 / steps[:used] ** (1 + block / 10)
    figure = hessian_figures(hessian_results(np.linspace(1, 29, count), history))["hessian_convergence"]
    axis = figure.axes[0]
    assert axis.get_legend() is None
    assert len(figure.axes) == 2, "a colour bar in place of the legend"
    curves = [line for line in axis.get_lines() if line.get_label().startswith("layer")]
    assert len({tuple(line.get_color()) for line in curves}) == count
    labelled = sorted(text.get_text() for text in axis.texts if text.get_text() != "tol")
    # Among the four longest curves, the three with the largest final distance: the least converged.
    assert labelled == ["layer13.weight", "layer20.weight", "layer6.weight"]
    plt.close("all")


def am_results(count=5) -> store.Results:
    results = store.Results(None)
    results["activation_maximization"] = {"conv1": {
        "display_images": np.ones((count, 1, 6, 6), dtype=np.float32),  # white images
        "channels": np.arange(count), "activations": np.ones(count), "dead": np.zeros(count, dtype=bool),
        "frames": np.full((2, count, 1, 6, 6), 255, dtype=np.uint8), "history": np.zeros((3, count)),
    }}
    results.attrs["config_yaml"] = "{}"
    return results


def test_white_am_tiles_are_framed(tmp_path):
    render_activation_maximization(am_results(), tmp_path, ["png"])
    pixels = np.asarray(Image.open(tmp_path / "activation_maximization_conv1.png").convert("RGB")).astype(int)
    grey = (np.abs(pixels - 140) <= 25).all(axis=2) & (pixels.std(axis=2) < 3)
    assert grey.sum() > 5 * 4 * 40, "each of the 5 white tiles needs a grey frame"

    with Image.open(tmp_path / "activation_maximization_conv1.gif") as gif:
        frame = np.asarray(gif.convert("RGB")).astype(int)
    tile = 6 * 11  # 6 pixels scaled up to at least 64
    assert (frame[0, : tile + 2] == 140).all(), "top frame line"
    assert (frame[1 : tile + 1, 1 : tile + 1] == 255).all(), "white image inside"
    assert (frame[:, tile + 1] == 140)[: tile + 2].all(), "line between the first two tiles"
    assert (frame[-1, -1] == 255).all(), "the empty place in the last row stays white"


def test_paper_am_grid_frames_every_tile():
    style = OmegaConf.structured(PrintStyleConfig())
    spec = OmegaConf.structured(FigureSpecConfig(kind="activation_maximization", name="x", max_channels=4))
    panels = [Panel("job", am_results(count=5), "0")]
    with plt.rc_context(print_style(style)):
        figure, _, _ = _activation_maximization(panels, spec, style)
    frames = [(patch.get_x(), patch.get_y(), patch.get_width()) for patch in figure.axes[0].patches]
    assert frames == [(-0.5, -0.5, 6), (6.5, -0.5, 6), (-0.5, 6.5, 6), (6.5, 6.5, 6)]
    plt.close(figure)


def training_results(path):
    store.create_results_file(path, {})
    store.write_group(path, "training", {"train_loss": [1.2, 0.5], "train_accuracy": [0.6, 0.9],
                                         "test_accuracy": [0.7, 0.92]})
    return path


def test_rerender_removes_only_its_stale_files(tmp_path):
    first = training_results(tmp_path / "a" / "results.h5")
    other = training_results(tmp_path / "b" / "results.h5")
    out = tmp_path / "shared"
    render_results(first, out, ["png", "pdf"])
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "training.pdf", "training.png"]
    (out / "notes.txt").write_text("mine")
    (out / "training.svg").write_text("a figure this results file never wrote")
    (tmp_path / "outside.txt").write_text("keep")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["written"]["../a/results.h5"] += ["../outside.txt", "notes.txt/.."]
    (out / MANIFEST).write_text(json.dumps(manifest))

    render_results(first, out, ["png"])
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt", "training.png", "training.svg"]
    assert (tmp_path / "outside.txt").read_text() == "keep"
    assert json.loads((out / MANIFEST).read_text()) == {"written": {"../a/results.h5": ["training.png"]}}

    # training.png is the other results file's figure now, so a render of the first one keeps it.
    render_results(other, out, ["png"])
    render_results(first, out, ["pdf"])
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt", "training.pdf", "training.png", "training.svg"]


def test_figures_cli_removes_old_formats(tmp_path):
    run = tmp_path / "run"
    training_results(run / "results.h5")
    for formats in ("[png,pdf]", "[svg]"):
        completed = run_cli([f"source={run}", f"formats={formats}"], cwd=tmp_path, entry="vizpipe-figures")
        assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in (run / "figures").iterdir()) == [MANIFEST, "training.svg"]


def test_corrupt_manifest_removes_nothing(tmp_path):
    path = training_results(tmp_path / "results.h5")
    out = tmp_path / "figures"
    render_results(path, out, ["png", "pdf"])
    (out / MANIFEST).write_text("{not json")
    render_results(path, out, ["png"])
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "training.pdf", "training.png"]
    assert json.loads((out / MANIFEST).read_text()) == {"written": {"../results.h5": ["training.png"]}}
