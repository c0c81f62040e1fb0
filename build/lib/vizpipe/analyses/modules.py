"""Layer lookup by dotted module name, with suggestions for typos."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from vizpipe.errors import VizpipeError, suggest

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, CONV_TYPES)]


def find_layer(model: nn.Module, name: str, kinds: tuple[type, ...] | None = None, purpose: str = "") -> nn.Module:
    """Return the submodule called ``name`` (as in ``named_modules()``).

    Raises ``VizpipeError`` naming the closest valid names when it does not exist,
    or when ``kinds`` is given and the module is of another type.
    """
    modules = dict(model.named_modules())
    modules.pop("", None)
    valid = [n for n, m in modules.items() if kinds is None or isinstance(m, kinds)]
    what = f" for {purpose}" if purpose else ""
    if name not in modules:
        raise VizpipeError(f"unknown layer {name!r}{what} in {type(model).__name__}. {suggest(name, valid)}")
    module = modules[name]
    if kinds is not None and not isinstance(module, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise VizpipeError(
            f"layer {name!r}{what} is a {type(module).__name__}, expected {expected}. {suggest(name, valid)}"
        )
    return module


def find_layers(model: nn.Module, names: Iterable[str], kinds=None, purpose: str = "") -> dict[str, nn.Module]:
    return {name: find_layer(model, name, kinds, purpose) for name in names}
