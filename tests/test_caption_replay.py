"""Caption replay (``caption_replay`` / ``MixedCaptions``): a share of the training captions in a
second style, drawn with the epoch's data order so runs without it keep their data and resumed runs
see the captions an uninterrupted one saw."""
import pytest
import torch

from e2_adapter.data import FashionGenH5, MixedCaptions, TrainViews
from e2_adapter.experiments import COARSE_TEMPLATE
from e2_adapter.training.config import TrainConfig
from e2_adapter.training.trainer import Trainer, epoch_batches, replay_captions
from e2_adapter.zoo import create_clip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(fashionsynth):
    return fashionsynth(products=64, val_products=8, seed=0, image_size=32)


def test_the_replay_catalogue_is_the_same_products_in_another_style(synth):
    main = FashionGenH5(synth[0])
    coarse = main.with_text_template(COARSE_TEMPLATE)
    assert coarse.product_ids() == main.product_ids() and coarse.all_tags() == main.all_tags()
    brand = main.tags(3)["brand"]
    assert brand in main.text(3) and brand not in coarse.text(3)  # the coarse style never names it
    mixed = MixedCaptions(main, coarse, 0.25)
    assert mixed.styled_text(3, 0) == main.text(3) == mixed.text(3) and mixed.styled_text(3, 1) == coarse.text(3)
    assert mixed.tags(5) == main.tags(5) and mixed.num_views(5) == main.num_views(5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        MixedCaptions(main, coarse, 1.0)
    with pytest.raises(ValueError, match="same products"):
        MixedCaptions(main, FashionGenH5(synth[0], max_products=10), 0.25)


def test_epoch_order_and_views_stay_and_the_style_share_follows_the_fraction(synth):
    main = FashionGenH5(synth[0])
    mixed = MixedCaptions(main, main.with_text_template(COARSE_TEMPLATE), 0.25)
    shares = []
    for epoch in range(20):
        plain = epoch_batches(len(main), main, 16, seed=3, epoch=epoch)
        styled = epoch_batches(len(mixed), mixed, 16, seed=3, epoch=epoch)
        assert [[k[:2] for k in b] for b in styled] == plain  # the data order of a run without replay
        assert styled == epoch_batches(len(mixed), mixed, 16, seed=3, epoch=epoch)  # a pure function
        shares += [k[2] for b in styled for k in b]
    assert set(shares) == {0, 1} and 0.18 < sum(shares) / len(shares) < 0.32


def test_train_views_write_the_drawn_style(synth):
    main = FashionGenH5(synth[0])
    coarse = main.with_text_template(COARSE_TEMPLATE)
    views = TrainViews(MixedCaptions(main, coarse, 0.5), transform=lambda im: torch.zeros(1))
    assert views[(2, 0, 1)]["text"] == coarse.text(2)
    assert views[(2, 0, 0)]["text"] == main.text(2) == views[(2, 0)]["text"]


def test_trainer_mixes_the_styles_and_rejects_data_it_cannot_restyle(synth, tmp_path):
    cfg = TrainConfig(method="clip-ft", batch_size=16, stage1_steps=0, stage2_steps=3, warmup_steps=1,
                      caption_replay=COARSE_TEMPLATE, caption_replay_fraction=0.5)
    bundle = create_clip("open_clip", "tiny", seed=0)
    trainer = Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, FashionGenH5(synth[0]), None, cfg,
                      tmp_path / "run", "open_clip", progress=False)
    assert isinstance(trainer.train_data, MixedCaptions)
    seen = []
    real = trainer.objective.forward

    def recording(images, texts, *args, **kwargs):
        seen.extend(texts)
        return real(images, texts, *args, **kwargs)
    trainer.objective.forward = recording
    trainer.fit(overwrite=True)
    coarse = {FashionGenH5(synth[0], text_template=COARSE_TEMPLATE).text(p) for p in range(64)}
    assert len(seen) == 48 and 0 < sum(t in coarse for t in seen) < 48
    assert replay_captions(trainer.train_data.main, TrainConfig()) is trainer.train_data.main  # off by default

    class NoTemplates:  # a catalogue whose texts cannot be re-read in another style
        pass
    with pytest.raises(ValueError, match="FashionGen-layout"):
        replay_captions(NoTemplates(), cfg)
    with pytest.raises(ValueError, match="caption_replay_fraction"):
        TrainConfig(caption_replay=COARSE_TEMPLATE, caption_replay_fraction=0.0)
