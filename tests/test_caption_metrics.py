"""Caption metrics (pycocoevalcap) and entity accuracy on hand-made cases."""
import shutil

import pytest

from integrations.captioning.metrics import SPICE_NOTE, caption_metrics, entity_accuracy, names_entity

REFS = {"a": ["A black leather jacket with a zip closure. Brand: Raf Simons."],
        "b": ["Red wool coat with four buttons and a belt."]}
SAME = {k: v[0] for k, v in REFS.items()}
DISJOINT = {"a": "xx yy zz ww qq vv", "b": "pp oo ii uu tt rr"}
BLEU = [f"BLEU@{n}" for n in range(1, 5)]

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer and METEOR need Java")


@needs_java
def test_coco_metrics_with_java():  # one call: the Java start-ups dominate the time
    half = caption_metrics({"a": SAME["a"], "b": DISJOINT["b"]}, REFS)
    for name in BLEU + ["METEOR", "ROUGE-L"]:
        assert 0.0 < half[name] < 1.0, name
    assert half["ROUGE-L"] == pytest.approx(0.5, abs=1e-6)  # mean of 1 (identical) and 0 (disjoint)
    assert half["SPICE"] is None and SPICE_NOTE in half["notes"]
    assert half["n"] == 2


def test_coco_metrics_without_java():
    same = caption_metrics(SAME, REFS, use_java=False)
    assert all(same[name] == pytest.approx(1.0, abs=1e-6) for name in BLEU + ["ROUGE-L"])
    assert same["METEOR"] is None and any("METEOR was skipped" in n for n in same["notes"])
    apart = caption_metrics(DISJOINT, REFS, use_java=False)
    assert all(apart[name] == pytest.approx(0.0, abs=1e-6) for name in BLEU + ["ROUGE-L", "CIDEr"])
    # more shared words, higher CIDEr (its idf is taken over the scored references)
    close = caption_metrics({"a": "a black leather jacket", "b": "red wool coat"}, REFS, use_java=False)
    assert 0 < close["BLEU@1"] < 1 and close["CIDEr"] > apart["CIDEr"]


def test_predictions_without_references_are_an_error():
    with pytest.raises(KeyError, match="no reference"):
        caption_metrics({"zzz": "a caption"}, REFS, use_java=False)


def test_entity_matching_ignores_case_and_tokenizer_spacing():
    assert names_entity("brand: raf simons. 9 6% cotton", "Raf Simons")
    assert names_entity("composition: 9 6 % cotton , 4 % polyurethane.", "96% cotton, 4% polyurethane")
    assert names_entity("a t - shirt from fw 2 0 1 6", "FW2016")
    assert names_entity("SUB-CATEGORY: T-SHIRTS", "t-shirts")
    assert not names_entity("100% cotton shirt", "96% cotton, 4% polyurethane")
    assert not names_entity("a shirt", "")


def test_entity_accuracy_on_hand_made_cases():
    tags = {
        "1": {"brand": "Raf Simons", "subcategory": "JACKETS", "composition": "100% lambskin", "season": "FW2016"},
        "2": {"brand": "Ostra", "subcategory": "SHIRTS", "composition": "100% cotton", "season": ""},
        "3": {"brand": "Vetrano", "subcategory": "PANTS", "composition": "100% wool", "season": "SS2017"},
        "4": {"brand": "Lune Paris", "subcategory": "COATS", "composition": "100% silk", "season": "SS2018"},
    }
    predictions = {
        "1": "Black leather jacket. Brand: Raf Simons. Composition: 100% lambskin. Season: FW2016.",
        "2": "Cotton shirt by Ostra.",  # "cotton" alone is not "100% cotton"
        "3": "Wool pants. Season: SS2017.",
        "4": "A coat.",
    }
    acc = entity_accuracy(predictions, tags)
    assert acc["brand"] == pytest.approx(2 / 4)
    assert acc["subcategory"] == pytest.approx(1 / 4)  # "jacket", "shirt", "coat" are not the plural tags
    assert acc["composition"] == pytest.approx(1 / 4)
    assert acc["season"] == pytest.approx(2 / 3)  # product 2 has no season: left out of the count
    assert acc["mean"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4 + 2 / 3) / 4)
    assert acc["n"] == 4
    assert entity_accuracy(predictions, tags, entities=("brand",)) == {"brand": 0.5, "mean": 0.5, "n": 4}
