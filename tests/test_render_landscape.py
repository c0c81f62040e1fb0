import numpy as np
import pytest
import torch
from torch import nn

from vizpipe import records, store
from vizpipe.analyses import loss_landscape
from vizpipe.analyses.directions import random_directions
from vizpipe.models import SmallCNN
from vizpipe.render import render_results
from vizpipe.render.landscape import contour_levels


@pytest.fixture
def small_landscape():
    torch.manual_seed(0)
    model = SmallCNN(input_channel=1, class_number=3, width=4, hidden=8)
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))
    return model, [(x, y)]


def write(tmp_path, result, attrs=None):
    path = store.create_results_file(tmp_path / "results.h5", {})
    store.write_group(path, *records.landscape_record(result, attrs or {"log_scale": False, "max_val": None}, {}))
    return path


def test_contour_levels_cover_the_data():
    values = np.ma.masked_invalid(np.array([[0.0, 30.0], [np.nan, 12.0]]))
    levels = contour_levels(values)
    assert levels[0] == 0.0
    assert levels[-1] == 30.0
    assert np.all(np.diff(levels) > 0)
    flat = contour_levels(np.ma.masked_invalid(np.full((3, 3), 2.5)))
    assert np.all(np.diff(flat) > 0)
    assert flat[0] < 2.5 < flat[-1]


def test_line_and_plane_figures(tmp_path, small_landscape):
    model, batches = small_landscape
    line = loss_landscape(model, batches, nn.CrossEntropyLoss(), dims=1, resolution=5, progress=False)
    written = {p.name for p in render_results(write(tmp_path / "line", line), formats=["png"])}
    assert written == {"landscape_line.png"}

    plane = loss_landscape(model, batches, nn.CrossEntropyLoss(), resolution=4, progress=False)
    written = {p.name for p in render_results(write(tmp_path / "plane", plane), formats=["png"])}
    assert {"landscape_contour.png", "landscape_heatmap.png", "landscape_surface.png", "landscape_surface.html"} <= written
    html = (tmp_path / "plane" / "figures" / "landscape_surface.html").read_text()
    assert 'id="vizpipe-landscape"' in html
    assert '"type":"surface"' in html


def test_partial_and_diverged_landscape_renders(tmp_path, small_landscape):
    model, batches = small_landscape
    directions = random_directions(model, dims=2)
    xs = torch.linspace(-1, 1, 4, dtype=torch.float64)
    path = store.create_results_file(tmp_path / "results.h5", {})
    store.write_group(path, *records.landscape_skeleton(xs, xs, directions, {"log_scale": True, "max_val": 5.0}))
    with store.PointWriter(path, "landscape", flush_every=0) as writer:
        writer.write((0, 0), 1.0, 0.5)
        writer.write((1, 1), float("inf"), 0.1)
        writer.write((2, 2), 3.0, 0.4)
        written = {p.name for p in render_results(path, tmp_path / "live", formats=["png"])}
    assert "landscape_contour.png" in written
    stored = store.read_results(path)["landscape"]
    assert int(stored["done"].sum()) == 3
    assert np.isinf(stored["loss"][1, 1]), "values are stored raw, never clipped"
