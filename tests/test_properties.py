"""Property tests: config validation over random values, and the HDF5 store over random content."""

import copy
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from vizpipe import store
from vizpipe.config import register_configs
from vizpipe.errors import VizpipeError
from vizpipe.runner import validate

register_configs()
with initialize_config_module("vizpipe.conf", version_base="1.3"):
    DEFAULT_CONFIG = compose("config")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Numeric fields of the analyses and the job, with the values that validate() accepts.
INTEGER_FIELDS = {
    "analysis.landscape.resolution": lambda v: v >= 1,
    "analysis.landscape.dims": lambda v: v in (1, 2),
    "analysis.hessian.max_iterations": lambda v: v >= 1,
    "analysis.hessian.density_steps": lambda v: v >= 1,
    "analysis.activation_maximization.iterations": lambda v: v >= 1,
    "analysis.activation_maximization.frame_every": lambda v: v >= 1,
    "analysis.activation_maximization.jitter": lambda v: v >= 0,
    "evaluation.batch_size": lambda v: v >= 1,
    "weights.epochs": lambda v: v >= 1,
}
FLOAT_FIELDS = {
    "analysis.hessian.tol": lambda v: v > 0,
    "analysis.hessian.density_sigma": lambda v: v > 0,
    "analysis.activation_maximization.lr": lambda v: v > 0,
    "analysis.activation_maximization.tv_weight": lambda v: v >= 0,
    "analysis.activation_maximization.blur_sigma": lambda v: v > 0,
    "analysis.activation_maximization.norm_crop": lambda v: 0 <= v < 100,
    "weights.lr": lambda v: v > 0,
}
CHOICE_FIELDS = {
    "analysis.conv_kernels.normalize": ("tile", "grid"),
    "analysis.landscape.normalization": ("filter", "layer", "none"),
    "analysis.landscape.ignore": ("biasbn", "none"),
    "analysis.hessian.method": ("power_iteration", "lanczos"),
    "analysis.hessian.group_by": ("parameter", "module"),
    "analysis.hessian.curvature": ("hessian", "ggn"),
    "analysis.activation_maximization.objective": ("channel", "neuron"),
    "evaluation.split": ("train", "test"),
}
RANGE_FIELDS = ("analysis.landscape.noise_range", "analysis.landscape.y_range")


def assign_and_validate(key, value):
    """Set ``key`` on a copy of the default config and validate it; return the error or None."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
        validate(cfg)
    except (VizpipeError, ValidationError) as error:
        return error
    return None


def not_a_number(text):
    try:
        float(text)
    except ValueError:
        return True
    return False


@FAST
@given(key=st.sampled_from(sorted(INTEGER_FIELDS)), value=st.integers(-10**6, 10**6))
def test_integer_fields_checked(key, value):
    error = assign_and_validate(key, value)
    if INTEGER_FIELDS[key](value):
        assert error is None, f"{key}={value} rejected: {error}"
    else:
        assert error is not None, f"{key}={value} accepted"
        assert key in str(error)
        assert str(value) in str(error)


@FAST
@given(key=st.sampled_from(sorted(FLOAT_FIELDS)), value=st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 100.0]), st.floats(allow_nan=True, allow_infinity=True)))
def test_float_fields_checked(key, value):
    error = assign_and_validate(key, value)
    if math.isfinite(value) and FLOAT_FIELDS[key](value):
        assert error is None, f"{key}={value} rejected: {error}"
    else:
        assert error is not None, f"{key}={value} accepted"
        assert key in str(error)


@FAST
@given(
    key=st.sampled_from(sorted(INTEGER_FIELDS) + sorted(FLOAT_FIELDS)),
    value=st.one_of(st.text(max_size=8).filter(not_a_number), st.lists(st.integers(), min_size=1, max_size=3)),
)
def test_numeric_fields_reject_other_types(key, value):
    error = assign_and_validate(key, value)
    assert error is not None, f"{key}={value!r} accepted"
    assert key in str(error)


@FAST
@given(key=st.sampled_from(sorted(CHOICE_FIELDS)), value=st.one_of(st.text(max_size=12), st.sampled_from(
    sorted({choice for choices in CHOICE_FIELDS.values() for choice in choices}))))
def test_choice_fields_checked(key, value):
    error = assign_and_validate(key, value)
    if value in CHOICE_FIELDS[key]:
        assert error is None, f"{key}={value!r} rejected: {error}"
    else:
        assert error is not None, f"{key}={value!r} accepted"
        assert key in str(error)


finite = st.floats(-1e3, 1e3, allow_nan=False)


@FAST
@given(key=st.sampled_from(RANGE_FIELDS), value=st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.floats(allow_nan=True), min_size=0, max_size=3),
    st.tuples(finite, finite).map(list), st.text(max_size=5), st.booleans(),
))
def test_coordinate_ranges_checked(key, value):
    error = assign_and_validate(key, value)
    single_valid = isinstance(value, float) and math.isfinite(value) and value > 0
    pair_valid = isinstance(value, list) and len(value) == 2 and all(math.isfinite(v) for v in value) and value[0] < value[1]
    if single_valid or pair_valid:
        assert error is None, f"{key}={value!r} rejected: {error}"
    else:
        assert error is not None, f"{key}={value!r} accepted"
        assert key in str(error)


# Store round trip.
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_]
names = st.text(min_size=1, max_size=12).filter(lambda name: "/" not in name and "\x00" not in name and name not in (".", ".."))


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 70), min_size=0, max_size=3)))
    assume(int(np.prod(shape)) <= 20_000)
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).normal(0, 100, shape)
    if dtype == np.bool_:
        return values > 0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(values, info.min, info.max).astype(dtype)
    return values.astype(dtype)


attribute_values = st.one_of(
    st.integers(-2**62, 2**62), st.floats(allow_nan=False), st.booleans(), st.none(),
    # NOTE: the store writes None as the string "None", so that string reads back as None.
    st.text(max_size=20).filter(lambda text: text != "None" and "\x00" not in text),
    st.lists(names, min_size=1, max_size=4),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    group=st.lists(names, min_size=1, max_size=3).map("/".join),
    datasets=st.dictionaries(names, arrays(), min_size=1, max_size=4),
    attrs=st.dictionaries(names, attribute_values, max_size=4),
)
def test_store_round_trip(tmp_path_factory, group, datasets, attrs):
    path = store.create_results_file(tmp_path_factory.mktemp("store") / "results.h5", {})
    store.write_group(path, group, datasets, attrs)
    results = store.read_results(path)

    node = results
    for part in group.split("/"):
        node = node[part]
    assert set(node) == set(datasets)
    for name, expected in datasets.items():
        stored = np.asarray(node[name])
        assert stored.dtype == expected.dtype, name
        assert stored.shape == expected.shape, name
        np.testing.assert_array_equal(stored, expected)
    stored_attrs = results.group_attrs[group]
    for key, expected in attrs.items():
        assert stored_attrs[key] == expected, key


@pytest.mark.parametrize("name", ["a/b", "", ".", ".."])
def test_invalid_dataset_names_rejected(tmp_path, name):
    path = store.create_results_file(tmp_path / "results.h5", {})
    with pytest.raises(ValueError, match="must not contain '/'"):
        store.write_group(path, "group", {name: np.zeros(2)})
    assert "group" not in store.read_results(path)


def write_skeleton(path, shape):
    store.create_results_file(path, {})
    store.write_group(path, "landscape", {
        "loss": np.full(shape, np.nan), "accuracy": np.full(shape, np.nan), "done": np.zeros(shape, dtype=bool),
    })


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    first=st.sets(st.integers(0, 35)),
    seed=st.integers(0, 2**32 - 1),
)
def test_point_writer_resume_equals_one_pass(tmp_path_factory, shape, first, seed):
    folder = tmp_path_factory.mktemp("points")
    points = list(np.ndindex(*shape))
    values = np.random.default_rng(seed).normal(size=(len(points), 2))
    first = {i for i in first if i < len(points)}

    write_skeleton(folder / "once.h5", shape)
    with store.PointWriter(folder / "once.h5", "landscape") as writer:
        for i, index in enumerate(points):
            writer.write(index, *values[i])

    write_skeleton(folder / "resumed.h5", shape)
    with store.PointWriter(folder / "resumed.h5", "landscape") as writer:
        for i in sorted(first):
            writer.write(points[i], *values[i])
    partial = store.read_results(folder / "resumed.h5")["landscape"]
    assert int(partial["done"].sum()) == len(first)
    with store.PointWriter(folder / "resumed.h5", "landscape") as writer:
        for i in sorted(set(range(len(points))) - first):
            writer.write(points[i], *values[i])

    once = store.read_results(folder / "once.h5")["landscape"]
    resumed = store.read_results(folder / "resumed.h5")["landscape"]
    for key in ("loss", "accuracy", "done"):
        np.testing.assert_array_equal(resumed[key], once[key])
    assert once["done"].all()


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from vizpipe import store
    writer = store.PointWriter(sys.argv[1], "landscape", flush_every=3600)
    for column in range(4):
        writer.write((0, column), float(column), 0.5)
    writer.flush()
    print("flushed", flush=True)
    for column in range(4):
        writer.write((1, column), 9.0, 0.5)
    time.sleep(600)
""")


def test_recover_after_kill_keeps_flushed_points(tmp_path):
    path = tmp_path / "results.h5"
    write_skeleton(path, (3, 4))
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert process.stdout.readline().strip() == "flushed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    assert store.recover_after_crash(path) is True
    assert store.recover_after_crash(path) is False
    landscape = store.read_results(path)["landscape"]
    assert landscape["done"][0].all()
    assert landscape["loss"][0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not landscape["done"][2].any()
    with store.PointWriter(path, "landscape") as writer:  # writable again
        writer.write((2, 0), 5.0, 1.0)
    assert store.read_results(path)["landscape"]["loss"][2, 0] == 5.0
