import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


class TinyConvNet(nn.Module):
    """Conv -> tanh -> linear, small enough for an exact Hessian (a few hundred parameters)."""

    def __init__(self, batch_norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3) if batch_norm else nn.Identity()
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


@pytest.fixture
def tiny_problem():
    """A float64 tiny conv net, 40 inputs of 1x6x6 and 4-class targets."""
    torch.manual_seed(0)
    model = TinyConvNet().double()
    x = torch.randn(40, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    return model, x, y


def run_cli(args, cwd: Path, entry: str = "vizpipe", timeout: int = 600, env_extra=None, preexec_fn=None):
    """Run a vizpipe console entry point as a user would, in a fresh process.

    ``preexec_fn`` runs in the child before the entry point starts (to set a resource limit, say).
    """
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(env_extra or {})
    executable = Path(sys.executable).parent / entry
    return subprocess.run(
        [str(executable), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        preexec_fn=preexec_fn,
    )
