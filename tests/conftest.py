import warnings

import pytest
import torch

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
