"""Checks of `vizpipe` command-line overrides that run before Hydra composes the config.

Hydra reports a misspelt key (``analysis.landscape.resolutoin=5``) or an
unknown config group option (``model=resnet9``) with a multi-line message that
suggests adding the key with ``+`` and lists no valid names. These checks catch
the common cases first and name the closest valid keys or options instead.
A value of the wrong type (``analysis.hessian.tol=abc``) fails Hydra's
composition with a multi-line message too, so values of schema fields are
checked here against the field's type. Overrides these checks cannot judge (sweep functions such as ``range(...)``, keys under
the plug-in nodes ``model``, ``dataset`` and ``loss``, ``hydra.*``) are left to Hydra.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, QuotedString
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from vizpipe.config import VizpipeConfig
from vizpipe.errors import suggest

CONFIG_GROUPS = ("model", "dataset", "analysis", "experiment")
# Schema fields typed Any: plug-in points whose keys depend on the chosen _target_.
_OPEN_FIELDS = ("model", "dataset", "loss")


def group_options(group: str) -> list[str]:
    """Return the option names of a config group: the YAML files in ``vizpipe/conf/<group>/``."""
    folder = resources.files("vizpipe.conf").joinpath(group)
    return sorted(item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml"))


def _schema_fields(schema: type) -> dict[str, type | None]:
    """Return each field's dataclass type (Optional unwrapped), or None for a leaf or plug-in field."""
    hints = typing.get_type_hints(schema)
    fields = {}
    for item in dataclasses.fields(schema):
        hint = hints[item.name]
        candidates = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        fields[item.name] = next((c for c in candidates if dataclasses.is_dataclass(c)), None)
    return fields


def _resolve(key: str) -> tuple[str | None, type | None]:
    """Walk the schema along ``key``.

    Return an error message when a part of ``key`` is unknown, and the dataclass
    that declares ``key`` as a plain field (None for a node, a plug-in key or a
    key below a leaf, which Hydra or the instantiation checks).
    """
    schema: type | None = VizpipeConfig
    parts = key.split(".")
    for index, part in enumerate(parts):
        if schema is None:
            return None, None
        fields = _schema_fields(schema)
        if part not in fields:
            name = ".".join([*parts[:index], part])
            return f"unknown config key {name!r}. {suggest(part, sorted(fields))} Check the spelling", None
        if index == 0 and part in _OPEN_FIELDS:
            return None, None
        if index == len(parts) - 1:
            return None, schema if fields[part] is None else None
        schema = fields[part]
    return None, None


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        names = [_type_name(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        return " or ".join(names) + " or null"
    if typing.get_origin(hint) in (list, typing.List):
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _wrong_type(key: str, value: str, schema: type) -> str | None:
    """Return an error message when ``value`` does not fit the type of field ``key`` of dataclass ``schema``."""
    if "${" in value:
        return None
    try:
        parsed = OverridesParser.create().parse_override(f"{key}={value}")
    except HydraException:
        return None  # Hydra reports its own syntax errors
    if parsed.is_sweep_override():
        return None  # each swept value is checked when its job composes the config
    node = OmegaConf.structured(schema)
    field = key.rsplit(".", 1)[-1]
    try:
        node[field] = parsed.value()
    except ValidationError:
        hint = typing.get_type_hints(schema)[field]
        return f"invalid {key} {value!r}: expected {_type_name(hint)}"
    return None


def group_selections(key: str, value: str) -> list[list[str]] | None:
    """Parse the option names that the config group override ``key=value`` selects, one list per job.

    Hydra's override parser reads the value, so quoted names (``model='mlp'``)
    and sweeps over lists (``analysis=[landscape],[hessian]``) are read as Hydra
    reads them. A ``null`` name comes back as ``"null"``. Return None for a
    value these checks cannot read: an interpolation, a sweep function such as
    ``glob(...)``, ``range(...)`` or ``choice(...)``, a dict, or a syntax error
    that Hydra reports.
    """
    if "${" in value:
        return None
    try:
        parsed = OverridesParser.create().parse_override(f"{key}={value}")
    except HydraException:
        return None
    if parsed.is_sweep_override():
        sweep = parsed.value()
        if not isinstance(sweep, ChoiceSweep) or not sweep.simple_form:
            return None
        job_values = sweep.list
    else:
        job_values = [parsed.value()]
    selections = []
    for job_value in job_values:
        items = job_value if isinstance(job_value, list) else [job_value]
        if any(isinstance(item, (dict, list)) for item in items):
            return None
        # Hydra unquotes a plain value but keeps QuotedString items in a sweep's values.
        texts = [item.text if isinstance(item, QuotedString) else item for item in items]
        selections.append(["null" if text is None else str(text) for text in texts])
    return selections


# Options that add config folders, whose group options the package's conf/ does not list.
_EXTRA_CONFIG_OPTIONS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def check_overrides(arguments: list[str]) -> str | None:
    """Return an error message for the first override with an unknown key, group option or wrong type, else None."""
    extra_configs = any(
        argument.split("=")[0] in _EXTRA_CONFIG_OPTIONS or "hydra.searchpath" in argument for argument in arguments
    )
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument or argument.startswith("~"):
            continue
        key, value = argument.split("=", 1)
        added = key.startswith("+")
        key = key.lstrip("+")
        if key.startswith("hydra") or "/" in key or "@" in key:
            continue
        if key in CONFIG_GROUPS:
            if extra_configs:
                continue  # the group may have options in the user's own config folder
            options = group_options(key)
            selections = group_selections(key, value) or []
            for name in (name for names in selections for name in names):
                if name == "null":
                    # Hydra fails on a null group option with a traceback from its defaults list.
                    return f"invalid {key} 'null': choose from {', '.join(options)}"
                if name not in options:
                    return f"unknown {key} {name!r}. {suggest(name, options)} Run vizpipe --help to list every option"
            continue
        if not added:
            message, schema = _resolve(key)
            if message is None and schema is not None:
                message = _wrong_type(key, value, schema)
            if message is not None:
                return message
    return None
