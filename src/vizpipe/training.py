"""Short training runs, checkpoint loading and weight fingerprints."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vizpipe.analyses.evaluation import LossFn, evaluate
from vizpipe.data.base import ImageDataset, batches, iterate_shuffled
from vizpipe.errors import VizpipeError

log = logging.getLogger(__name__)


@dataclass
class TrainingHistory:
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    dataset: ImageDataset,
    loss_fn: LossFn,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> TrainingHistory:
    """Train ``model`` with Adam for ``epochs`` epochs; log and return per-epoch metrics.

    The training split is moved to ``device`` once and shuffled by a generator
    seeded with ``seed``. ``on_epoch_end(epoch, model)`` runs after each epoch's
    evaluation (to save a trajectory, say). The model is left in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    x_train, y_train = dataset.x_train.to(device), dataset.y_train.to(device)
    test_batches = batches(dataset.x_test.to(device), dataset.y_test.to(device), 512)
    history = TrainingHistory()
    for epoch in tqdm(range(1, epochs + 1), desc="training", disable=None if progress else True, unit="epoch"):
        model.train()
        total, correct, count = 0.0, 0, 0
        for inputs, targets in iterate_shuffled(x_train, y_train, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(inputs)
            correct += int((outputs.argmax(dim=1) == targets).sum())
            count += len(inputs)
        model.eval()
        _, test_accuracy, _ = evaluate(model, test_batches, loss_fn)
        history.train_loss.append(total / count)
        history.train_accuracy.append(correct / count)
        history.test_accuracy.append(test_accuracy)
        log.info(
            "epoch %d/%d: train loss %.4f, train accuracy %.4f, test accuracy %.4f",
            epoch, epochs, total / count, correct / count, test_accuracy,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    model.zero_grad(set_to_none=True)
    model.eval()
    return history


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state_dict file with ``torch.load(weights_only=True)`` on the CPU.

    A dict that wraps the state_dict under ``"state_dict"`` or ``"model"`` is
    accepted too. Raises ``VizpipeError`` for a missing, truncated or non-tensor
    file; ``what`` names the file's role in the messages.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise VizpipeError(f"{what} not found: {path}; give the path of an existing state_dict file")
    if not zipfile.is_zipfile(path) and not _looks_like_legacy_torch_file(path):
        raise VizpipeError(
            f"{what} {path} is not a PyTorch file (torch.save writes a zip archive); it may be truncated or of "
            "another format. Save it with torch.save(model.state_dict(), path)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", _plain_text(error))
        culprit = f" (it references {found.group(1)})" if found else ""
        raise VizpipeError(
            f"{what} {path} was rejected by weights_only loading{culprit}: it contains Python objects other than "
            "tensors, which could run code. Save only the weights with torch.save(model.state_dict(), path)"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first_line = _plain_text(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise VizpipeError(f"{what} {path} is truncated or not a PyTorch file ({first_line})") from error

    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VizpipeError(
            f"{what} {path} is not a state_dict (a dict of tensors); save it with torch.save(model.state_dict(), path)"
        )
    return state


def _plain_text(error: BaseException) -> str:
    """Return the error's message without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()


def _looks_like_legacy_torch_file(path: Path) -> bool:
    """True for the pickle-based format torch.save wrote before PyTorch 1.6 (it starts with a pickle opcode)."""
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into ``model`` (see ``read_state_dict``).

    Raises ``VizpipeError`` listing missing, unexpected and mis-shaped keys on a mismatch.
    """
    state = read_state_dict(path)
    path = Path(path).expanduser()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{key} {list(state[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short_list(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatch: {_short_list(mis_shaped)}")
        raise VizpipeError(
            f"checkpoint {path} does not fit {type(model).__name__} ({'; '.join(parts)}); "
            "check that the model config matches the checkpoint"
        )
    model.load_state_dict(state)


def _short_list(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """Write ``model.state_dict()`` to ``path`` with ``torch.save``, replacing the file only once fully written.

    A failed write (a full disk, say) raises ``OSError`` with ``errno`` and
    ``filename`` set and leaves an existing ``path`` as it was.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    temporary = path.with_name(path.name + ".writing")
    try:
        temporary.write_bytes(buffer.getbuffer())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def weight_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the state_dict's names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{list(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]
