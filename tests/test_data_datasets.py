"""TrainViews / EvalImages / collate through real DataLoaders."""

import pytest
import torch
from torch.utils.data import DataLoader

from e2_adapter.data import (CLIP_MEAN, EvalImages, FashionGenH5, TrainViews, collate,
                             default_transform, write_fashionsynth)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    path = write_fashionsynth(tmp_path_factory.mktemp("ds"), products=12, val_products=4,
                              seed=2, views=(2, 3))[0]
    cat = FashionGenH5(path)
    cat.load_image(0)  # the parent holds an open handle: workers must not reuse it
    return cat


def _images(loader):
    return torch.cat([batch["image"] for batch in loader])


@pytest.mark.parametrize("workers", [0, 2])
def test_train_views_through_dataloader(catalogue, workers):
    ds = TrainViews(catalogue, default_transform(32))
    loader = DataLoader(ds, batch_size=5, shuffle=True, num_workers=workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    batch = batches[0]
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["product"].dtype == torch.long and len(batch["text"]) == 5
    assert set(batch["tags"]) == set(catalogue.entities)
    assert all(len(values) == 5 for values in batch["tags"].values())
    p = int(batch["product"][0])
    assert batch["text"][0] == catalogue.text(p)
    assert batch["tags"]["brand"][0] == catalogue.tags(p)["brand"]
    seen = torch.cat([b["product"] for b in batches]).tolist()
    assert sorted(seen) == list(range(len(catalogue)))


@pytest.mark.parametrize("workers", [0, 2])
def test_random_views_follow_the_loader_seed(catalogue, workers):
    def run(seed):
        torch.manual_seed(seed)  # num_workers=0 draws from the global RNG
        loader = DataLoader(TrainViews(catalogue, default_transform(32)), batch_size=4,
                            num_workers=workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(seed))
        return torch.cat([_images(loader) for _ in range(3)])  # three epochs: many view draws
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_eval_images_first_and_all(catalogue):
    first = EvalImages(catalogue, default_transform(32))
    every = EvalImages(catalogue, default_transform(32), views="all")
    assert len(first) == len(catalogue)
    assert len(every) == sum(catalogue.num_views(p) for p in range(len(catalogue)))
    assert every.products[:2] == [0, 0]
    batch = next(iter(DataLoader(every, batch_size=7, num_workers=2, collate_fn=collate)))
    assert batch["image"].shape == (7, 3, 32, 32)
    assert batch["product"].tolist() == every.products[:7]
    with pytest.raises(ValueError, match="views"):
        EvalImages(catalogue, default_transform(32), views="some")


def test_default_transform_normalizes_with_clip_stats(catalogue):
    x = default_transform(48)(catalogue.load_image(0))
    assert x.shape == (3, 48, 48)
    white = default_transform(8)(catalogue.load_image(0).point(lambda _: 255))
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(
        (0.26862954, 0.26130258, 0.27577711)), atol=1e-5)


def test_collate_keeps_strings_and_rejects_empty():
    out = collate([{"a": "x", "n": 1, "flag": True}, {"a": "y", "n": 2, "flag": False}])
    assert out["a"] == ["x", "y"] and out["n"].tolist() == [1, 2] and out["flag"] == [True, False]
    with pytest.raises(ValueError):
        collate([])
