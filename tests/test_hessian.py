import torch
from conftest import TinyConvNet
from torch import nn
from torch.func import functional_call, hessian

from vizpipe.analyses import hessian_block_eigenvalues
from vizpipe.analyses.hessian import block_hvps


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
    vectors = {b: torch.randn_like(p) for b, p in enumerate(parameters)}
    one = block_hvps(model, [(x, y)], nn.CrossEntropyLoss(), parameters, vectors)
    split = [(x[:32], y[:32]), (x[32:], y[32:])]  # 32 + 8 samples
    many = block_hvps(model, split, nn.CrossEntropyLoss(), parameters, vectors)
    for b in vectors:
        torch.testing.assert_close(one[b], many[b], rtol=1e-10, atol=1e-12)


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
