import logging
import math
import weakref

import pytest
import torch
from conftest import TinyConvNet
from torch import nn
from torch.func import functional_call, hessian

from vizpipe.analyses import hessian_block_eigenvalues
from vizpipe.analyses.eigensolvers import Lanczos
from vizpipe.analyses.linear_operators import HessianOperator
from vizpipe.errors import VizpipeError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_block_eigenvalues(model, x, y, loss_fn=nn.CrossEntropyLoss()):
    """Largest-magnitude eigenvalue of each parameter's exact diagonal Hessian block."""
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of(name, value):
        merged = {**params, name: value}
        return loss_fn(functional_call(model, (merged, buffers), (x,)), y)

    values = {}
    for name, value in params.items():
        block = hessian(lambda v: loss_of(name, v))(value).reshape(value.numel(), value.numel())
        eigenvalues = torch.linalg.eigvalsh(block)
        values[name] = float(eigenvalues[eigenvalues.abs().argmax()])
    return values


def test_power_iteration_matches_exact_blocks(tiny_problem):
    model, x, y = tiny_problem
    exact = exact_block_eigenvalues(model, x, y)
    result = hessian_block_eigenvalues(
        model, [(x, y)], nn.CrossEntropyLoss(), max_iterations=3000, tol=1e-12, progress=False
    )
    assert result.parameter_names == list(exact)
    for name, value in zip(result.parameter_names, result.eigenvalues.tolist()):
        assert abs(value - exact[name]) <= 1e-3 * abs(exact[name]), (name, value, exact[name])


def test_lanczos_matches_exact_blocks_tightly(tiny_problem):
    model, x, y = tiny_problem
    exact = exact_block_eigenvalues(model, x, y)
    result = hessian_block_eigenvalues(
        model, [(x, y)], nn.CrossEntropyLoss(), method="lanczos", max_iterations=200, tol=1e-12, progress=False
    )
    for name, value in zip(result.parameter_names, result.eigenvalues.tolist()):
        assert abs(value - exact[name]) <= 1e-6 * abs(exact[name]), (name, value, exact[name])
    assert bool(result.converged.all())
    assert float(result.residuals.max()) < 1e-4


def test_batchnorm_model_in_eval_mode_matches_exact():
    torch.manual_seed(1)
    model = TinyConvNet(batch_norm=True).double()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(30, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    model.train()
    exact = exact_block_eigenvalues(model, x, y)
    model.train()
    result = hessian_block_eigenvalues(
        model, [(x, y)], nn.CrossEntropyLoss(), method="lanczos", max_iterations=200, tol=1e-12, progress=False
    )
    assert model.training, "the model's train mode must be restored"
    for name, value in zip(result.parameter_names, result.eigenvalues.tolist()):
        assert abs(value - exact[name]) <= 1e-6 * abs(exact[name]), (name, value, exact[name])


def test_block_values_differ_from_coupled_full_hessian(tiny_problem):
    """The per-block values are not the slices of a full-Hessian power iteration."""
    model, x, y = tiny_problem
    exact = exact_block_eigenvalues(model, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([p.flatten() for p in params.values()])
    shapes = [(n, p.shape, p.numel()) for n, p in params.items()]

    def loss_of(vector):
        merged, offset = {}, 0
        for name, shape, count in shapes:
            merged[name] = vector[offset : offset + count].view(shape)
            offset += count
        return nn.functional.cross_entropy(functional_call(model, merged, (x,)), y)

    full = hessian(loss_of)(flat)
    block = full[: shapes[0][2], : shapes[0][2]]
    eigenvalues = torch.linalg.eigvalsh(block)
    assert abs(float(eigenvalues[eigenvalues.abs().argmax()]) - exact["conv.weight"]) < 1e-9
    top_full = float(torch.linalg.eigvalsh(full).abs().max())
    assert top_full > max(abs(v) for v in exact.values())


def test_uneven_batches_give_the_full_batch_products(tiny_problem):
    model, x, y = tiny_problem
    model.eval()
    parameters = list(model.parameters())
    vectors = {b: torch.randn(p.numel(), dtype=p.dtype) for b, p in enumerate(parameters)}
    one = HessianOperator(model, [(x, y)], nn.CrossEntropyLoss(), parameters).matvec(vectors)
    split = [(x[:32], y[:32]), (x[32:], y[32:])]  # 32 + 8 samples
    many = HessianOperator(model, split, nn.CrossEntropyLoss(), parameters).matvec(vectors)
    for b in vectors:
        torch.testing.assert_close(one[b], many[b], rtol=1e-10, atol=1e-12)


def test_one_batch_graph_alive_at_a_time():
    """With several batches, a batch's graph is freed before the next batch's forward pass."""

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
            self.hidden = []  # weak references to each forward pass's hidden activations

        def forward(self, x):
            hidden = torch.tanh(self.fc1(x))  # saved by fc2 for backward: alive while its graph is
            self.hidden.append(weakref.ref(hidden))
            return self.fc2(hidden)

    torch.manual_seed(0)
    model = Recording().double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    alive = []

    def loss_fn(outputs, targets):
        alive.append(sum(ref() is not None for ref in model.hidden))
        return nn.functional.cross_entropy(outputs, targets)

    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    parameters = list(model.parameters())
    vectors = {b: torch.randn(p.numel(), dtype=p.dtype) for b, p in enumerate(parameters)}
    HessianOperator(model, batches, loss_fn, parameters).matvec(vectors)
    assert alive == [1, 1, 1]  # only the batch being evaluated


def test_frozen_and_unused_parameters():
    class WithUnused(TinyConvNet):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.ones(3))

    torch.manual_seed(0)
    model = WithUnused().double()
    model.conv.bias.requires_grad_(False)
    x = torch.randn(20, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    result = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), max_iterations=50, progress=False)
    assert result.skipped == ["conv.bias"]
    assert "conv.bias" not in result.parameter_names
    index = result.parameter_names.index("unused")
    assert result.eigenvalues[index] == 0.0
    assert bool(result.converged[index])
    assert not torch.isnan(result.eigenvalues).any()
    assert not torch.isnan(result.residuals).any()


def test_no_grad_written_and_seed_reproducible(tiny_problem):
    model, x, y = tiny_problem
    first = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), max_iterations=15, seed=3, progress=False)
    second = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), max_iterations=15, seed=3, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(first.eigenvalues, second.eigenvalues)


def exact_full_hessian(model, x, y, loss_fn, names):
    """Exact Hessian of the mean loss over the flattened, concatenated parameters ``names``."""
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    shapes = [(name, params[name].shape, params[name].numel()) for name in names]
    flat = torch.cat([params[name].flatten() for name in names])

    def loss_of(vector):
        merged, offset = dict(params), 0
        for name, shape, count in shapes:
            merged[name] = vector[offset : offset + count].view(shape)
            offset += count
        return loss_fn(functional_call(model, (merged, buffers), (x,)), y)

    return hessian(loss_of)(flat)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


class SaddleToy(nn.Module):
    """``a * b * x + c * x``: the ``(a, b)`` block has one negative eigenvalue."""

    def __init__(self):
        super().__init__()
        self.product = nn.Module()
        self.product.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.product.b = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x):
        return self.product.a * self.product.b * x + self.c * x


def dominant(matrix):
    eigenvalues = torch.linalg.eigvalsh(matrix)
    return float(eigenvalues[eigenvalues.abs().argmax()]), float(eigenvalues.min()), float(eigenvalues.max())


def test_mlp_lanczos_matches_exact_blocks():
    torch.manual_seed(2)
    model = TinyMLP().double()
    x = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    names = [name for name, _ in model.named_parameters()]
    full = exact_full_hessian(model, x, y, nn.CrossEntropyLoss(), names)
    result = hessian_block_eigenvalues(
        model, [(x, y)], nn.CrossEntropyLoss(), method="lanczos", max_iterations=200, tol=1e-12, progress=False
    )
    offset = 0
    for name, size, value in zip(result.block_names, result.block_sizes, result.eigenvalues.tolist()):
        expected, _, _ = dominant(full[offset : offset + size, offset : offset + size])
        offset += size
        assert abs(value - expected) <= 1e-6 * abs(expected), (name, value, expected)
    assert bool(result.converged.all())


def test_module_blocks_match_exact(tiny_problem):
    model, x, y = tiny_problem
    result = hessian_block_eigenvalues(
        model, [(x, y)], nn.CrossEntropyLoss(), method="lanczos", group_by="module",
        which="extremes", max_iterations=300, tol=1e-12, progress=False,
    )
    assert result.block_names == ["conv", "fc"]
    assert result.block_parameters == [["conv.weight", "conv.bias"], ["fc.weight", "fc.bias"]]
    for name, parameters, index in zip(result.block_names, result.block_parameters, range(2)):
        full = exact_full_hessian(model, x, y, nn.CrossEntropyLoss(), parameters)
        expected, smallest, largest = dominant(full)
        assert abs(result.eigenvalues[index] - expected) <= 1e-6 * abs(expected), name
        assert abs(result.largest[index] - largest) <= 1e-6 * abs(largest), name
        assert abs(result.smallest[index] - smallest) <= 1e-6 * abs(largest), name


def test_include_exclude_patterns(tiny_problem):
    model, x, y = tiny_problem
    result = hessian_block_eigenvalues(
        model, [(x, y)], nn.CrossEntropyLoss(), include=["*.weight", "fc.*"], exclude=["fc.bias"],
        max_iterations=5, progress=False,
    )
    assert result.block_names == ["conv.weight", "fc.weight"]


def test_unmatched_pattern_names_the_fix(tiny_problem):
    model, x, y = tiny_problem
    with pytest.raises(VizpipeError, match=r"include pattern 'conv.wieght' matches no parameter.*conv.weight"):
        hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), include=["conv.wieght"], progress=False)
    with pytest.raises(VizpipeError, match="group_by .layer."):
        hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), group_by="layer", progress=False)


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("method", ["lanczos", "power_iteration"])
def test_negative_curvature_found_with_sign(method, verify):
    model = SaddleToy()
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 2 * x + 0.1 * torch.sin(5 * x)
    names = ["product.a", "product.b"]
    exact = exact_full_hessian(model, x, y, nn.MSELoss(), names)
    expected, smallest, largest = dominant(exact)
    assert smallest < 0 < largest
    result = hessian_block_eigenvalues(
        model, [(x, y)], nn.MSELoss(), method=method, group_by="module", which="extremes",
        max_iterations=500, tol=1e-13, progress=False, verify=verify,
    )
    index = result.block_names.index("product")
    assert result.disagreeing == ([] if verify else None)
    assert abs(result.smallest[index] - smallest) <= 1e-6 * abs(smallest)
    assert abs(result.largest[index] - largest) <= 1e-6 * abs(largest)
    assert abs(result.eigenvalues[index] - expected) <= 1e-6 * abs(expected)
    assert bool(result.converged[index])


def test_negated_loss_gives_negative_dominant_values(tiny_problem):
    model, x, y = tiny_problem
    exact = exact_block_eigenvalues(model, x, y)

    def negated(outputs, targets):
        return -nn.functional.cross_entropy(outputs, targets)

    result = hessian_block_eigenvalues(model, [(x, y)], negated, method="lanczos", max_iterations=200, tol=1e-12,
                                       progress=False)
    for name, value in zip(result.block_names, result.eigenvalues.tolist()):
        assert abs(value + exact[name]) <= 1e-6 * abs(exact[name]), (name, value, exact[name])


def test_unconverged_blocks_flagged_and_warned(tiny_problem, caplog):
    model, x, y = tiny_problem
    with caplog.at_level(logging.WARNING, logger="vizpipe.analyses.hessian"):
        result = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), max_iterations=2, tol=1e-12,
                                           progress=False)
    assert not bool(result.converged.any())
    assert result.iterations.tolist() == [2, 2, 2, 2]
    assert "conv.weight" in caplog.text and "fc.bias" in caplog.text
    assert bool((result.residuals > 0).all())


def test_blocks_stop_early_and_residuals_are_true(tiny_problem):
    model, x, y = tiny_problem
    result = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), method="lanczos", max_iterations=200,
                                       tol=1e-8, progress=False)
    assert bool(result.converged.all())
    assert len(set(result.iterations.tolist())) > 1, "blocks should stop at different iterations"
    for b, used in enumerate(result.iterations.tolist()):
        assert not torch.isnan(result.history[b, :used]).any()
        assert torch.isnan(result.history[b, used:]).all()



def test_residual_bounds_the_eigenvalue_error(tiny_problem):
    """For a symmetric H, a Rayleigh pair lies within ||H v - lambda v|| of some eigenvalue."""
    model, x, y = tiny_problem
    power = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), max_iterations=8, tol=1e-12,
                                      progress=False)
    for name, value, residual in zip(power.block_names, power.eigenvalues.tolist(), power.residuals.tolist()):
        eigenvalues = torch.linalg.eigvalsh(exact_full_hessian(model, x, y, nn.CrossEntropyLoss(), [name]))
        distance = float((eigenvalues - value).abs().min())
        assert distance <= residual * abs(value) * (1 + 1e-9) + 1e-12, name
        assert residual > 1e-6, "8 power-iteration steps should leave a visible residual"


def test_operator_matches_dense_module_block(tiny_problem):
    model, x, y = tiny_problem
    model.eval()
    parameters = [model.conv.weight, model.conv.bias]
    operator = HessianOperator(model, [(x, y)], nn.CrossEntropyLoss(), parameters, [[0, 1]])
    exact = exact_full_hessian(model, x, y, nn.CrossEntropyLoss(), ["conv.weight", "conv.bias"])
    torch.testing.assert_close(operator.dense_block(0), exact, rtol=1e-9, atol=1e-12)
    assert operator.products == exact.shape[0]


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_lanczos_waits_out_a_plateau(seed):
    """Close top eigenvalues (1, 0.97, 0.96): the estimate stalls below 1 for a step before it rises."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(50, generator=generator, dtype=torch.float64)
    values[:3] = torch.tensor([1.0, 0.97, 0.96], dtype=torch.float64)
    matrix = torch.diag(values)
    start = torch.randn(50, generator=generator, dtype=torch.float64)
    tol = 1e-3

    change_only = Lanczos(start, tol)
    previous = float("nan")
    for _ in range(50):
        change_only.step(matrix @ change_only.vector)
        if abs(change_only.eigenvalue - previous) < tol * abs(change_only.eigenvalue):
            break
        previous = change_only.eigenvalue
    assert abs(change_only.eigenvalue - 1.0) > tol  # stopping on the change alone ends on the plateau

    solver = Lanczos(start, tol)
    while not solver.done:
        solver.step(matrix @ solver.vector)
    assert abs(solver.eigenvalue - 1.0) <= tol
    assert solver.tracked_errors[0] < tol


def test_lanczos_extremes_residual_is_dominant_pair(tiny_problem):
    """The Krylov space depends only on the start, so both runs share the dominant Ritz pair."""
    model, x, y = tiny_problem
    options = {"method": "lanczos", "max_iterations": 6, "tol": 1e-12, "progress": False}
    magnitude = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), which="magnitude", **options)
    extremes = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), which="extremes", **options)
    torch.testing.assert_close(extremes.eigenvalues, magnitude.eigenvalues, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(extremes.residuals, magnitude.residuals, rtol=1e-9, atol=1e-15)


class NotFiniteToy(nn.Module):
    """``a * x + sqrt(|b|)``: at ``b = 0`` the ``b`` block's derivatives are NaN, the ``a`` block's are finite."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        return x @ self.a + torch.sqrt(self.b.abs()).sum()


@pytest.mark.parametrize("method", ["lanczos", "power_iteration"])
def test_nan_products_stop_only_their_block(method, caplog):
    torch.manual_seed(0)
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.zeros(20, dtype=torch.float64)
    model = NotFiniteToy()
    exact = float(torch.linalg.eigvalsh(2 * x.T @ x / 20).max())
    with caplog.at_level(logging.WARNING, logger="vizpipe.analyses.hessian"):
        result = hessian_block_eigenvalues(model, [(x, y)], nn.MSELoss(), method=method, tol=1e-10,
                                           max_iterations=200, progress=False)
    assert result.block_names == ["a", "b"]
    assert result.eigenvalues[0] == pytest.approx(exact, rel=1e-6)
    assert bool(result.converged[0])
    assert math.isnan(result.eigenvalues[1])
    assert not bool(result.converged[1])
    assert int(result.iterations[1]) == 1, "a block with NaN products stops at once"
    assert "NaN or infinite Hessian-vector products" in caplog.text
    assert "did not converge" not in caplog.text


def test_nan_input_lanczos_extremes_no_crash():
    model = NotFiniteToy()
    x = torch.randn(20, 3, dtype=torch.float64)
    x[0, 0] = float("nan")
    result = hessian_block_eigenvalues(model, [(x, torch.zeros(20, dtype=torch.float64))], nn.MSELoss(),
                                       method="lanczos", which="extremes", progress=False)
    assert torch.isnan(result.eigenvalues).all()
    assert torch.isnan(result.smallest).all()
    assert not bool(result.converged.any())


def test_lanczos_extremes_stop_near_zero():
    """A smallest eigenvalue inside a bulk near zero is judged against the norm, not against itself."""
    generator = torch.Generator().manual_seed(0)
    bulk = 1e-7 + 1e-3 * torch.rand(199, generator=generator, dtype=torch.float64)
    values = torch.cat([torch.tensor([5.0], dtype=torch.float64), bulk])
    matrix = torch.diag(values)
    tol = 1e-4

    solver = Lanczos(torch.randn(200, generator=generator, dtype=torch.float64), tol, which="extremes")
    for _ in range(10):
        solver.step(matrix @ solver.vector)
        if solver.done:
            break
    assert solver.done
    smallest, largest = solver.tracked.tolist()
    assert abs(largest - 5.0) <= tol * 5.0
    assert abs(smallest - float(values.min())) <= tol * 5.0
    assert solver.tracked_residuals[0] > tol  # relative to itself, the smallest value is far from converged


class QuadraticToy(nn.Module):
    """A parameter vector ``w`` whose loss ``0.5 w.(A w)`` has Hessian ``A``."""

    def __init__(self, size: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size, dtype=torch.float64))

    def forward(self, inputs):
        return self.w


def hidden_top_problem(seed, size=50):
    """A Hessian whose dominant eigenvector (eigenvalue 1) is orthogonal to the first start vector.

    The first start is the first Gaussian draw from ``seed``, as
    ``hessian_block_eigenvalues`` draws it, so its Krylov space never reaches
    the dominant eigenvector and its run ends at the next eigenvalue, 0.5.
    """
    generator = torch.Generator().manual_seed(seed)
    first_start = torch.randn(size, generator=generator, dtype=torch.float64)
    other = torch.randn(size, size, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    top = other[:, 0] - (other[:, 0] @ first_start) / (first_start @ first_start) * first_start
    basis, _ = torch.linalg.qr(torch.cat([top[:, None], other[:, 1:]], dim=1))
    values = torch.cat([torch.tensor([1.0, 0.5]), torch.linspace(0.0, 0.3, size - 2)]).double()
    matrix = basis @ torch.diag(values) @ basis.T

    def loss_fn(w, _):
        return 0.5 * w @ (matrix @ w)

    return QuadraticToy(size), [(torch.zeros(1, 1), torch.zeros(1))], loss_fn


@pytest.mark.parametrize("method", ["lanczos", "power_iteration"])
def test_verify_catches_missed_dominant_eigenvalue(method, caplog):
    model, batches, loss_fn = hidden_top_problem(seed=3)
    options = {"method": method, "tol": 1e-6, "max_iterations": 300, "seed": 3, "progress": False}
    single = hessian_block_eigenvalues(model, batches, loss_fn, **options)
    # Its residual is small, since 0.5 is an eigenvalue, so no stopping rule can tell.
    assert single.eigenvalues[0] == pytest.approx(0.5, rel=1e-4)
    assert bool(single.converged[0])
    assert single.residuals[0] < 1e-2
    assert single.eigenvalues_by_start is None
    assert single.disagreeing is None

    with caplog.at_level(logging.WARNING, logger="vizpipe.analyses.hessian"):
        checked = hessian_block_eigenvalues(model, batches, loss_fn, verify=True, **options)
    assert checked.verify
    assert checked.disagreeing == ["w"]
    assert checked.eigenvalues_by_start[0, 0] == pytest.approx(0.5, rel=1e-4)
    assert checked.eigenvalues[0] == checked.eigenvalues_by_start[0, 1] == pytest.approx(1.0, rel=1e-4)
    assert checked.products == int(checked.iterations[0]) + single.products
    assert "two independent starts" in caplog.text
    assert caplog.text.rstrip().endswith(": w")


@pytest.mark.parametrize("method", ["lanczos", "power_iteration"])
def test_verify_agrees_on_exact_blocks(tiny_problem, method):
    model, x, y = tiny_problem
    exact = exact_block_eigenvalues(model, x, y)
    options = {"method": method, "tol": 1e-10, "max_iterations": 3000, "progress": False}
    checked = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss(), verify=True, **options)
    assert checked.disagreeing == []
    rel = 1e-6 if method == "lanczos" else 1e-3
    for name, value, (first, second) in zip(checked.block_names, checked.eigenvalues.tolist(),
                                            checked.eigenvalues_by_start.tolist()):
        assert value == pytest.approx(exact[name], rel=rel), name
        assert first == pytest.approx(exact[name], rel=rel), name
        assert second == pytest.approx(exact[name], rel=rel), name
