"""Caption replay: fine-tune on a catalogue's captions with a share of them in another style.

Fine-tuning on one caption style makes a CLIP forget the style it was pre-trained on; a zero-shot
pipeline that writes queries in that older style (CIReVL's captions) then loses (README, composed
retrieval controls). ``MixedCaptions`` keeps the old style in the training mix: each time a product
is drawn, its text is the ``replay`` catalogue's with probability ``fraction``, else the main one's.
The trainer draws that choice with the epoch's data order (``epoch_batches``), so a resumed run sees
the same captions as an uninterrupted one. Everything else (images, tags, boxes) is the main
catalogue's.
"""
from __future__ import annotations

from typing import Optional

from PIL import Image

from .catalogue import Box, ProductCatalogue


class MixedCaptions(ProductCatalogue):
    """``main``'s products; text style 1 is ``replay``'s text of the same product, drawn with
    probability ``fraction`` during training (style 0, ``main``'s, everywhere else)."""

    def __init__(self, main: ProductCatalogue, replay: ProductCatalogue, fraction: float):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"the replayed share of captions must be between 0 and 1 (exclusive), got {fraction}")
        if len(replay) != len(main):
            raise ValueError(f"the replay catalogue has {len(replay)} products, the main one {len(main)}: "
                             "both must list the same products (e.g. one file read with two text templates)")
        if replay.product_ids() != main.product_ids():
            raise ValueError("the replay catalogue lists the products in another order or other products; "
                             "read the same file with another text template")
        self.main, self.replay = main, replay
        self.style_probability = fraction  # of style 1, drawn by the trainer (``epoch_batches``)
        self.entities = main.entities

    def styled_text(self, p: int, style: int) -> str:
        return (self.replay if style else self.main).text(p)

    # -- the main catalogue's products ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.main)

    def num_views(self, p: int) -> int:
        return self.main.num_views(p)

    def load_image(self, p: int, view: int = 0) -> Image.Image:
        return self.main.load_image(p, view)

    def text(self, p: int) -> str:
        return self.main.text(p)

    def tags(self, p: int) -> dict[str, str]:
        return self.main.tags(p)

    def group(self, p: int) -> str:
        return self.main.group(p)

    def product_id(self, p: int) -> str:
        return self.main.product_id(p)

    def regions(self, p: int, view: int = 0) -> Optional[dict[str, Box]]:
        return self.main.regions(p, view)

    def texts(self) -> list[str]:
        return self.main.texts()

    def groups(self) -> list[str]:
        return self.main.groups()

    def product_ids(self) -> list[str]:
        return self.main.product_ids()

    def all_tags(self) -> dict[str, list[str]]:
        return self.main.all_tags()
