import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

# Plain helpers live in helpers.py; re-exported here for the test files that still write
# ``from conftest import ...`` (test_capdec, test_decap, test_captioning, test_interop).
from helpers import (FAMILIES, WrongWidth, assert_swap_touches_no_weights, load_benchmark,  # noqa: F401,E402
                     make_tiny, random_images)


@pytest.fixture(name="make_tiny", scope="session")
def make_tiny_fixture():
    """``make_tiny(family, seed=0)``: a random-init tiny CLIP of that family, in eval mode."""
    return make_tiny


@pytest.fixture(name="load_benchmark", scope="session")
def load_benchmark_fixture():
    """``load_benchmark(name)``: benchmarks/<name>.py imported as a module."""
    return load_benchmark


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture(scope="session")
def fashionsynth(tmp_path_factory):
    """``fashionsynth(**spec)``: the (train, val) h5 paths of write_fashionsynth(**spec), written once
    per session for each spec (files that ask for the same small data share it; read it, never write)."""
    from e2_adapter.data import write_fashionsynth
    written = {}

    def build(**spec):
        key = tuple(sorted(spec.items()))
        if key not in written:
            written[key] = write_fashionsynth(tmp_path_factory.mktemp("fashionsynth"), **spec)
        return written[key]
    return build


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
