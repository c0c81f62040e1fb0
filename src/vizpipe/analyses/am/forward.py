"""Running a model up to one layer, with its parameters frozen and restored."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn

from vizpipe.errors import VizpipeError

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@contextmanager
def capture_output(module: nn.Module, stop: bool = True):
    """Record the output of ``module``; with ``stop``, abort the forward pass right after it."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["output"] = output
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def frozen_eval(model: nn.Module):
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter; restore both."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def channels_last_weights(model: nn.Module):
    """Store 4D parameters in channels-last order for the duration; restore the original tensors.

    oneDNN convolutions on CPU run faster on channels-last weights and inputs.
    Only ``Parameter.data`` is swapped, so the parameter objects and their values
    stay the same, and the original storage is put back afterwards.
    """
    swapped = []
    try:
        for parameter in model.parameters():
            if parameter.dim() == 4:
                swapped.append((parameter, parameter.data))
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
        yield model
    finally:
        for parameter, original in swapped:
            parameter.data = original


def layer_output(model: nn.Module, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``inputs`` up to ``module`` and return that module's output."""
    with capture_output(module) as captured:
        try:
            model(inputs)
        except _StopForward:
            pass
    if "output" not in captured:
        raise VizpipeError(f"layer {type(module).__name__} was not reached in the model's forward pass")
    output = captured["output"]
    if not isinstance(output, torch.Tensor):
        raise VizpipeError(f"layer output is a {type(output).__name__}, not a tensor; pick another layer")
    return output


def _trace_layer_call(model: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.Node] | None:
    """Trace ``model`` and return the graph module with the node of ``layer``'s first call, or None."""
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: use the hook or the whole layer instead
        log.debug("torch.fx cannot trace %s (%s)", type(model).__name__, error)
        return None
    target = next((n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == layer), None)
    return None if target is None else (graph_module, target)


def _end_graph_at(graph_module: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    """Make ``node`` the graph's output and drop everything it does not need."""
    graph = graph_module.graph
    for existing in list(graph.nodes):
        if existing.op == "output":
            graph.erase_node(existing)
    graph.output(node)
    graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def truncate(model: nn.Module, layer: str) -> fx.GraphModule | None:
    """Return a copy of ``model``'s forward graph that ends at ``layer``'s first call.

    The graph module shares the model's submodules and parameters. Returns
    None when ``torch.fx`` cannot trace the model (data-dependent control flow,
    say) or when the layer is not called as a module in the traced graph.
    """
    traced = _trace_layer_call(model, layer)
    return None if traced is None else _end_graph_at(*traced)


def layer_forward(model: nn.Module, layer: str, module: nn.Module, compile: bool = False) -> Callable:
    """Return a function from model inputs to ``layer``'s output that runs no further than the layer.

    It is the model's traced graph cut at the layer when ``torch.fx`` can trace
    the model, else the model with a hook that stops the forward pass at the
    layer. ``compile`` wraps the truncated graph in ``torch.compile``.
    """
    truncated = truncate(model, layer)
    if truncated is None:
        if compile:
            log.warning("torch.fx cannot cut %s at %s, so it is not compiled", type(model).__name__, layer)
        return lambda inputs: layer_output(model, module, inputs)
    if compile:
        return torch.compile(truncated, dynamic=False)
    return truncated


def truncate_before(model: nn.Module, layer: str) -> fx.GraphModule | None:
    """Return a copy of ``model``'s forward graph that ends with the input of ``layer``'s first call.

    Returns None when ``torch.fx`` cannot trace the model, when the layer is
    not called as a module, or when it is called with more than one input.
    """
    traced = _trace_layer_call(model, layer)
    if traced is None:
        return None
    graph_module, target = traced
    if len(target.args) != 1 or target.kwargs or not isinstance(target.args[0], fx.Node):
        return None
    return _end_graph_at(graph_module, target.args[0])


class SelectedChannelForward:
    """Forward pass from the model's inputs to a conv layer's output that computes only channel ``targets[i]`` for image ``i``.

    The layer's input is computed as usual; then one grouped convolution with
    the batch as groups applies to image ``i`` only filter ``targets[i]``. A
    first layer of 64 channels so costs 1/64 of the full layer for the same
    objective. ``__call__`` returns [B, 1, H, W], channel 0 of row ``i`` being
    channel ``targets[i]`` of the full output.
    """

    def __init__(self, features: Callable, conv: nn.Conv2d):
        self.features = features
        self.conv = conv

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Return whether ``module`` is a Conv2d this class can slice: ungrouped, with zero padding."""
        return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = self.features(inputs)
        batch, channels, height, width = features.shape
        weight = self.conv.weight[targets]  # [B, C_in, kh, kw]: one filter per image
        bias = self.conv.bias[targets] if self.conv.bias is not None else None
        output = F.conv2d(
            features.reshape(1, batch * channels, height, width), weight, bias,
            self.conv.stride, self.conv.padding, self.conv.dilation, groups=batch,
        )
        return output.view(batch, 1, *output.shape[2:])


def selected_channel_forward(model: nn.Module, layer: str, module: nn.Module, compile: bool = False
                             ) -> SelectedChannelForward | None:
    """Return a ``SelectedChannelForward`` for ``layer``, or None when the model or layer does not allow it."""
    if not SelectedChannelForward.supports(module):
        return None
    features = truncate_before(model, layer)
    if features is None:
        return None
    if compile:
        features = torch.compile(features, dynamic=False)
    return SelectedChannelForward(features, module)
