"""Zero-shot captioning with an E2 encoder, end to end on CPU in under a minute.

1. Write a small FashionSynth dataset (FashionGen's h5 schema) and read its captions.
2. Take a CLIP and wrap it with E2 (here a random tiny one; use your trained model or adapter).
3. Train CapDec and DeCap *text-only*, on that encoder's own text embeddings.
4. Caption validation images from ``encode_image``, then score BLEU/METEOR/ROUGE-L/CIDEr and
   entity accuracy (does the caption name the brand, sub-category, composition, season?).

    python examples/captioning.py [--out runs/captioning_example] [--steps 100]

With random tiny models the numbers only show that the pipeline runs; see
``benchmarks/captioning.py`` for the CLIP-FT vs E2 comparison with trained encoders.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import e2_adapter
from e2_adapter.data.synth import write_fashionsynth
from e2_adapter.zoo import create_clip
from integrations.capdec import CapDec, small_gpt2_config, train_capdec
from integrations.captioning import WordTokenizer, caption_metrics, embed_texts, entity_accuracy, load_corpus
from integrations.decap import DeCap, DeCapConfig, train_decap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/captioning_example")
    p.add_argument("--products", type=int, default=300)
    p.add_argument("--steps", type=int, default=100, help="training steps per captioner")
    p.add_argument("--style", default="tags_first", help="caption style (see integrations.captioning.STYLES)")
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.time()
    out = Path(args.out)

    # 1. data: one caption per product, tags for entity accuracy
    train_h5, val_h5 = write_fashionsynth(out / "data", products=args.products, val_products=40, image_size=32)
    train, val = load_corpus(train_h5, args.style), load_corpus(val_h5, args.style)
    print(f"{len(train)} training captions, e.g. {train.captions[0]!r}")

    # 2. the encoder: any CLIP-like model; E2 keeps encode_image / encode_text unchanged
    clip = create_clip("open_clip", "tiny", seed=0)
    encoder = e2_adapter.wrap(clip.model) or clip.model
    text_embeddings = embed_texts(encoder, clip.tokenizer, train.captions)  # computed once, frozen encoder

    # 3. text-only training (pass the real GPT-2 with lm="gpt2" when it can be downloaded)
    word_tokenizer = WordTokenizer.fit(train.captions)
    capdec = CapDec.create(64, lm=small_gpt2_config(word_tokenizer, n_layer=2, n_embd=64, n_positions=128),
                           tokenizer=word_tokenizer, mapping="mlp", stop_token=None, max_tokens=60)
    train_capdec(capdec, encoder, clip.tokenizer, train.captions, text_embeddings=text_embeddings,
                 max_steps=args.steps, batch_size=16, lr=3e-3, warmup_steps=10, encoder_name="tiny E2")
    decap = DeCap.for_captions(DeCapConfig(64, n_layer=2, n_head=2, n_embd=64, max_caption_tokens=64,
                                           max_tokens=64), train.captions)
    train_decap(decap, encoder, clip.tokenizer, train.captions, text_embeddings=text_embeddings,
                max_steps=args.steps, batch_size=16, lr=3e-3, warmup_steps=10, encoder_name="tiny E2")

    # 4. caption validation images (first view of each product) and score them
    images = torch.stack([clip.preprocess(im) for im in val.images()])
    for name, captioner, method in (("CapDec", capdec, "beam"), ("DeCap", decap, "greedy")):
        captions = captioner.caption(encoder, images, method=method)
        predictions = dict(zip(val.product_ids, captions))
        scores = caption_metrics(predictions, val.references())
        entities = entity_accuracy(predictions, val.tags())
        captioner.save_pretrained(out / name.lower())
        print(f"\n{name}: {captions[0]!r}\n  reference: {val.captions[0]!r}")
        print("  " + "  ".join(f"{k} {100 * v:.1f}" for k, v in scores.items() if isinstance(v, float)))
        print("  entity accuracy: " + "  ".join(f"{k} {100 * v:.0f}%" for k, v in entities.items()
                                               if isinstance(v, float)))
    # Swapping encoders is one argument: decap.caption(other_encoder, images) -- but a decoder
    # only understands the encoder whose text tower trained it, so retrain it for a new encoder.
    print(f"\ndone in {time.time() - start:.0f} s; decoders saved under {out}")


if __name__ == "__main__":
    main()
