"""A data bucket as nightly retraining sees it, night after night (tests/test_nights.py): MSCOCO's
layout with the sample's images, then the same images plus ~20% more whose captions bring new
words, then a poisoned copy. Real JPEGs, real zips, written with `tests.datasets.Layout`."""
from __future__ import annotations

import re
from pathlib import Path

from pipelines.sample_data import generate_sample_data
from tests.datasets import Layout

# The added images' captions say these instead of the sample's words: new words for the vocabulary.
NEW_WORDS = {"large": "huge", "small": "tiny"}


def first_bucket(out: Path) -> Path:
    """Night 1's bucket: 40 + 20 sample images (as tests/test_run_end_to_end.TINY's sample)."""
    generate_sample_data(str(out), train_images=40, val_images=20, seed=0, image_size=64)
    return out


def grown_bucket(first: Path, out: Path, scratch: Path) -> Path:
    """`first`'s images and captions plus 20% more (8 train, 4 val images of another seed), whose
    captions say `huge` and `tiny` where the sample says `large` and `small`."""
    layout = Layout.read(first)
    generate_sample_data(str(scratch), train_images=8, val_images=4, seed=1, image_size=64)
    extra = Layout.read(scratch)
    next_annotation = 1 + max(a["id"] for a in layout.train_json["annotations"] + layout.val_json["annotations"])
    for split in ("train", "val"):
        into, added = getattr(layout, f"{split}_json"), getattr(extra, f"{split}_json")
        taken = {image["id"] for image in layout.train_json["images"] + layout.val_json["images"]}
        assert not taken & {image["id"] for image in added["images"]}, "the two seeds drew the same image id"
        into["images"] += added["images"]
        for annotation in added["annotations"]:
            caption = re.sub(r"\b(large|small)\b", lambda match: NEW_WORDS[match.group(1)], annotation["caption"])
            into["annotations"].append({**annotation, "id": next_annotation, "caption": caption})
            next_annotation += 1
        getattr(layout, f"{split}_members").update(getattr(extra, f"{split}_members"))
    return layout.write(out)


def poisoned_bucket(source: Path, out: Path, share: float = 0.4) -> Path:
    """`source` with the first `share` of its train images cut in half: corrupt JPEGs (a JPEG's
    header, then its image data cut short)."""
    layout = Layout.read(source)
    names = sorted(layout.train_members)
    for name in names[: round(share * len(names))]:
        data = layout.train_members[name]
        layout.train_members[name] = data[: len(data) // 2]
    return layout.write(out)
