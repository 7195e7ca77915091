import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

FAMILIES = ("open_clip", "openai", "hf")


def make_tiny(family: str, seed: int = 0):
    from e2_adapter.zoo import create_clip
    return create_clip(family, "tiny", seed=seed).model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_images(clip, n=3, seed=0):
    """Random pixels of a ClipBundle's input size."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, clip.image_size, clip.image_size, generator=g)


class WrongWidth(nn.Module):
    """A CLIP-like encoder whose joint space is 32-d."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 32)

    def encode_image(self, x):
        return self.proj(x.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.proj(torch.ones(len(tokens), 3))


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (a script folder, not a package) as a module."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_swap_touches_no_weights(decoder: nn.Module, caption, encoders, images) -> None:
    """Captioning ``images`` with each encoder in turn (``caption(encoder, images)``) changes neither the
    decoder's state (a memory bank included) nor any encoder's: swapping is the encoder argument only."""
    def snapshot(m):
        return {k: v.clone() for k, v in m.state_dict().items()}
    saved_decoder, saved_encoders = snapshot(decoder), [snapshot(m) for m in encoders]
    for encoder in encoders:
        caption(encoder, images)
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, saved_decoder[k]), k
    for m, saved in zip(encoders, saved_encoders):
        assert all(torch.equal(v, saved[k]) for k, v in m.state_dict().items())


@pytest.fixture
def crash_trainer_at(monkeypatch):
    """``crash_trainer_at(step)``: the next training run is killed (KeyboardInterrupt) right after
    logging ``step``; call the returned ``undo()`` to let the following runs through."""
    from e2_adapter.training.trainer import Trainer
    original = Trainer.log_step

    def arm(step: int):
        def crashing(self, *args):
            original(self, *args)
            if self.state.step == step:
                raise KeyboardInterrupt("simulated kill")
        monkeypatch.setattr(Trainer, "log_step", crashing)
        return lambda: monkeypatch.setattr(Trainer, "log_step", original)
    return arm


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now, for torch.distributed rendezvous (never a fixed one)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nan_loss_at(monkeypatch):
    """``nan_loss_at(n)``: the trainer's n-th E2 loss comes out NaN (a diverging run)."""
    import e2_adapter.training.trainer as trainer_module
    real, calls = trainer_module.e2_loss, {"n": 0}

    def arm(n: int):
        def poisoned(*args, **kwargs):
            out = real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == n:
                out["loss"] = out["loss"] * float("nan")
            return out
        monkeypatch.setattr(trainer_module, "e2_loss", poisoned)
    return arm
