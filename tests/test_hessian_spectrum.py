import math

import numpy as np
import pytest
import torch
from test_hessian import TinyMLP, exact_full_hessian
from torch import nn
from torch.func import functional_call, hessian, jacrev

from vizpipe import records, store
from vizpipe.analyses import hessian_block_eigenvalues
from vizpipe.analyses.hessian_spectrum import (
    eigenvector_directions,
    hessian_density,
    hessian_top_eigenvalues,
    hessian_trace,
)
from vizpipe.analyses.landscape import loss_landscape
from vizpipe.errors import VizpipeError
from vizpipe.render import render_results


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlp_problem():
    torch.manual_seed(3)
    model = TinyMLP().double()
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    names = [name for name, _ in model.named_parameters()]
    return model, x, y, exact_full_hessian(model, x, y, nn.CrossEntropyLoss(), names)


def test_top_k_matches_exact(mlp_problem):
    model, x, y, exact = mlp_problem
    expected = torch.linalg.eigvalsh(exact).flip(0)[:4]
    result = hessian_top_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), k=4, max_iterations=66, tol=1e-10,
                                     eigenvectors=True, progress=False)
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-6, atol=0)
    assert result.converged
    assert result.iterations < exact.shape[0], "Lanczos should converge before spanning the whole space"
    assert float(result.residuals.max()) < 1e-4
    assert result.eigenvectors.shape == (4, exact.shape[0])
    for value, vector in zip(expected, result.eigenvectors):
        assert float((exact @ vector - value * vector).norm()) <= 1e-5 * float(value)


def test_top_k_power_iteration_matches_exact(mlp_problem):
    model, x, y, exact = mlp_problem
    values, vectors = torch.linalg.eigh(exact)
    order = torch.argsort(values.abs(), descending=True)[:3]
    result = hessian_top_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), k=3, max_iterations=3000, tol=1e-12,
                                     eigenvectors=True, progress=False, method="power_iteration")
    torch.testing.assert_close(result.eigenvalues, values[order], rtol=1e-6, atol=0)
    assert result.converged
    assert result.method == "power_iteration"
    assert result.history.shape == (result.iterations, 3)
    assert result.eigenvectors.shape == (3, exact.shape[0])
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(3, dtype=torch.float64),
                               rtol=0, atol=1e-8)
    for value, vector in zip(values[order], result.eigenvectors):
        assert float((exact @ vector - value * vector).norm()) <= 1e-4 * abs(float(value))


def test_top_k_power_iteration_zero_operator():
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    # The loss is linear in the weights, so the Hessian is zero.
    result = hessian_top_eigenvalues(model, [(x, x.sum(1, keepdim=True))], lambda out, _: out.mean(), k=2,
                                     max_iterations=10, progress=False, method="power_iteration")
    torch.testing.assert_close(result.eigenvalues, torch.zeros(2, dtype=torch.float64), rtol=0, atol=0)
    assert result.converged
    assert not torch.isnan(result.residuals).any()


def test_top_k_rejects_unknown_method(mlp_problem):
    model, x, y, _ = mlp_problem
    with pytest.raises(VizpipeError, match="invalid Hessian top-k method 'arnoldi'"):
        hessian_top_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), k=2, method="arnoldi", progress=False)


def test_top_k_rejects_too_large_k(mlp_problem):
    model, x, y, exact = mlp_problem
    with pytest.raises(VizpipeError, match=f"only {exact.shape[0]} entries"):
        hessian_top_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), k=exact.shape[0] + 1,
                                max_iterations=500, progress=False)


def rademacher_standard_error(matrix, probes):
    """Exact standard error of Hutchinson's estimator: Var(z^T H z) = 2 (||H||_F^2 - sum H_ii^2)."""
    off_diagonal = float((matrix**2).sum() - (torch.diagonal(matrix) ** 2).sum())
    return math.sqrt(2 * off_diagonal / probes)


def test_trace_within_three_standard_errors(mlp_problem):
    model, x, y, exact = mlp_problem
    result = hessian_trace(model, [(x, y)], nn.CrossEntropyLoss(), max_probes=400, min_probes=10,
                           relative_standard_error=0.1, progress=False)
    probes = len(result.samples)
    assert result.converged
    assert 10 <= probes < 400
    assert result.standard_error <= 0.1 * abs(result.trace)
    true_error = rademacher_standard_error(exact, probes)
    assert abs(result.trace - float(torch.trace(exact))) <= 3 * true_error
    assert result.standard_error == pytest.approx(true_error, rel=0.6)


def test_trace_stops_at_max_probes(mlp_problem):
    model, x, y, _ = mlp_problem
    result = hessian_trace(model, [(x, y)], nn.CrossEntropyLoss(), max_probes=5, min_probes=3,
                           relative_standard_error=1e-9, progress=False)
    assert not result.converged
    assert len(result.samples) == 5


def test_density_integral_and_mean(mlp_problem):
    model, x, y, exact = mlp_problem
    n = exact.shape[0]
    runs = 8
    result = hessian_density(model, [(x, y)], nn.CrossEntropyLoss(), runs=runs, steps=30, sigma=0.01,
                             grid_points=4000, seed=1, progress=False)
    assert result.nodes.shape == (runs, 30)
    torch.testing.assert_close(result.weights.sum(dim=1), torch.ones(runs, dtype=torch.float64))
    assert float(torch.trapezoid(result.density, result.grid)) == pytest.approx(1.0, abs=1e-3)
    mean = float(torch.trapezoid(result.grid * result.density, result.grid))
    quadrature_mean = float((result.nodes * result.weights).sum() / runs)
    assert mean == pytest.approx(quadrature_mean, rel=1e-3)
    # Gaussian unit vectors: Var(v^T H v) = 2 (n ||H||_F^2 - tr(H)^2) / (n^2 (n + 2))
    trace = float(torch.trace(exact))
    variance = 2 * (n * float((exact**2).sum()) - trace**2) / (n**2 * (n + 2))
    assert abs(quadrature_mean - trace / n) <= 3 * math.sqrt(variance / runs)
    eigenvalues = torch.linalg.eigvalsh(exact)
    assert float(result.nodes.max()) == pytest.approx(float(eigenvalues.max()), rel=1e-6)


def test_frozen_and_unused_whole_model_without_nan():
    class WithUnused(TinyMLP):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.ones(2))

    torch.manual_seed(0)
    model = WithUnused().double()
    model.hidden.bias.requires_grad_(False)
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    top = hessian_top_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), k=2, max_iterations=60, progress=False)
    trace = hessian_trace(model, [(x, y)], nn.CrossEntropyLoss(), max_probes=20, progress=False)
    density = hessian_density(model, [(x, y)], nn.CrossEntropyLoss(), runs=2, steps=10, progress=False)
    assert "hidden.bias" not in top.parameter_names
    assert "unused" in top.parameter_names
    assert not torch.isnan(top.eigenvalues).any()
    assert not math.isnan(trace.trace)
    assert not math.isnan(trace.standard_error)
    assert not torch.isnan(density.density).any()


def test_eigenvector_directions_give_landscape_curvature(mlp_problem):
    """Along a unit eigenvector the loss's second difference is its eigenvalue."""
    model, x, y, exact = mlp_problem
    top = hessian_top_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), k=2, max_iterations=66, tol=1e-10,
                                  eigenvectors=True, progress=False)
    first, second = eigenvector_directions(model, top)
    step = 1e-3
    result = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), noise_range=step, resolution=3,
                            directions=(first, second), progress=False)
    along_first = float(result.loss[1, 0] + result.loss[1, 2] - 2 * result.loss[1, 1]) / step**2
    along_second = float(result.loss[0, 1] + result.loss[2, 1] - 2 * result.loss[1, 1]) / step**2
    assert along_first == pytest.approx(float(top.eigenvalues[0]), rel=1e-4)
    assert along_second == pytest.approx(float(top.eigenvalues[1]), rel=1e-4)


def exact_ggn(model, x, y, names):
    """``J^T H_z J`` over the flattened parameters ``names``, from dense Jacobians."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    shapes = [(name, params[name].shape, params[name].numel()) for name in names]
    flat = torch.cat([params[name].flatten() for name in names])

    def outputs_of(vector):
        merged, offset = dict(params), 0
        for name, shape, count in shapes:
            merged[name] = vector[offset : offset + count].view(shape)
            offset += count
        return functional_call(model, merged, (x,))

    outputs = outputs_of(flat)
    jacobian = jacrev(outputs_of)(flat).reshape(outputs.numel(), -1)
    output_hessian = hessian(lambda z: nn.functional.cross_entropy(z.view_as(outputs), y))(outputs.flatten())
    return jacobian.T @ output_hessian @ jacobian


def test_ggn_blocks_and_top_k_match_exact(mlp_problem):
    model, x, y, _ = mlp_problem
    blocks = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), method="lanczos", which="extremes",
                                       curvature="ggn", max_iterations=100, tol=1e-12, progress=False)
    assert blocks.curvature == "ggn"
    for name, largest, smallest in zip(blocks.block_names, blocks.largest.tolist(), blocks.smallest.tolist()):
        eigenvalues = torch.linalg.eigvalsh(exact_ggn(model, x, y, [name]))
        assert largest == pytest.approx(float(eigenvalues.max()), rel=1e-6), name
        assert smallest >= -1e-10 * largest, f"{name}: the GGN is positive semi-definite"

    names = [name for name, _ in model.named_parameters()]
    expected = torch.linalg.eigvalsh(exact_ggn(model, x, y, names)).flip(0)[:3]
    top = hessian_top_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), k=3, max_iterations=66, tol=1e-10,
                                  curvature="ggn", progress=False)
    torch.testing.assert_close(top.eigenvalues, expected, rtol=1e-6, atol=0)


def test_results_file_roundtrip_and_figures(mlp_problem, tmp_path):
    model, x, y, _ = mlp_problem
    loss_fn = nn.CrossEntropyLoss()
    blocks = hessian_block_eigenvalues(model, [(x, y)], loss_fn, method="lanczos", which="extremes",
                                       max_iterations=30, progress=False)
    top = hessian_top_eigenvalues(model, [(x, y)], loss_fn, k=2, eigenvectors=True, progress=False)
    trace = hessian_trace(model, [(x, y)], loss_fn, max_probes=12, progress=False)
    density = hessian_density(model, [(x, y)], loss_fn, runs=2, steps=10, progress=False)
    path = store.create_results_file(tmp_path / "results.h5", {})
    for record in records.hessian_records(blocks, top, trace, density):
        store.write_group(path, *record)

    results = store.read_results(path)
    group = results["hessian"]
    assert list(group["block_names"]) == blocks.block_names
    np.testing.assert_array_equal(group["smallest"], blocks.smallest.numpy())
    np.testing.assert_array_equal(group["top_k"]["eigenvectors"], top.eigenvectors.numpy())
    np.testing.assert_array_equal(group["density"]["weights"], density.weights.numpy())
    assert results.group_attrs["hessian/trace"]["trace"] == trace.trace
    assert results.group_attrs["hessian"]["which"] == "extremes"
    assert not results.group_attrs["hessian"]["verify"]

    metrics = records.hessian_metrics(blocks, top, trace)
    assert metrics["hessian/top_k/2"] == float(top.eigenvalues[1])
    assert metrics["hessian/trace_standard_error"] == trace.standard_error
    assert metrics["hessian/smallest_eigenvalue/hidden.weight"] == float(blocks.smallest[0])

    written = render_results(path, tmp_path / "figures", ["png"])
    assert sorted(p.name for p in written) == ["hessian_convergence.png", "hessian_density.png", "hessian_eigenvalues.png"]


def test_nan_model_gives_nan_trace_and_density(mlp_problem, caplog):
    model, x, y, _ = mlp_problem
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.nan
    loss_fn = nn.CrossEntropyLoss()

    trace = hessian_trace(model, [(x, y)], loss_fn, max_probes=20, progress=False)
    assert len(trace.samples) == 1, "probing stops at the first NaN sample"
    assert math.isnan(trace.trace)
    assert not trace.converged

    density = hessian_density(model, [(x, y)], loss_fn, runs=2, steps=10, grid_points=50, progress=False)
    assert density.nodes.shape == (2, 1)
    assert density.grid.shape == (50,)
    assert torch.isnan(density.density).all()
    assert caplog.text.count("NaN or infinite Hessian-vector products") == 2
