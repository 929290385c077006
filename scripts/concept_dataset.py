"""Write a concept's small training set: text-to-image samples that name a shape the default shapes world never draws
(``nextstep.data.shapes.concept``), as a folder source (``OUT/images/*.png`` + ``OUT/captions.jsonl``) that a recipe
reads with ``"data": {"source": "folder", "path": OUT}``.

    python scripts/concept_dataset.py star data/star-64 --n 64 --seed 0 [--replay 4000 --repeat 12] \
        [--mix single_object=0.25,two_objects=0.5,counting=0.25]

Prints the number of samples per category and three captions.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from nextstep.data.shapes import CONCEPT_MIX, CONCEPT_SHAPES, concept_dataset
from nextstep.errors import NextStepError
from nextstep.train.config import TrainConfig, load_recipe


def parse_mix(text: str) -> dict[str, float]:
    """"single_object=0.25,two_objects=0.5" -> {"single_object": 0.25, "two_objects": 0.5}."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--mix takes CATEGORY=WEIGHT,... (e.g. two_objects=0.5), got {part!r}") from None
    return mix


def replay_options(recipe: str) -> dict:
    """ShapesDataset's mix, backgrounds and weights from a training recipe's data section (its defaults included)."""
    data = load_recipe(recipe, TrainConfig).data
    if data.source != "shapes":
        raise ValueError(f"--replay-like: {recipe} does not train on the shapes source")
    return {"mix": {k: v for k, v in data.mix.items() if k != "text"}, "backgrounds": data.backgrounds,
            "weights": data.weights or None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", choices=CONCEPT_SHAPES)
    p.add_argument("out", help="output directory (must not hold a captions.jsonl yet)")
    p.add_argument("--n", type=int, default=64, help="samples (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, the bundled model's)")
    p.add_argument("--replay", type=int, default=0,
                   help="samples of the default shapes world to add (text-to-image and edits), so that fine-tuning "
                        "keeps what the model could do (default 0)")
    p.add_argument("--repeat", type=int, default=1,
                   help="list each concept sample this many times (its share of the batches beside --replay)")
    p.add_argument("--replay-like", default=None, metavar="RECIPE",
                   help="draw the replay as this training recipe's shapes data draws it (its data section's mix, "
                        "backgrounds and weights): the recipe of the base model's last stage, so that the replay is "
                        "what the base was last trained on (default: the shapes world's defaults)")
    p.add_argument("--mix", default=None, metavar="CATEGORY=W,...",
                   help="weights of the concept's categories in its samples (default "
                        + ",".join(f"{c}={w:g}" for c, w in CONCEPT_MIX.items()) + ")")
    args = p.parse_args()
    try:
        mix = CONCEPT_MIX if args.mix is None else parse_mix(args.mix)
        index = concept_dataset(args.concept, args.out, n=args.n, seed=args.seed, size=args.size,
                                replay=args.replay, repeat=args.repeat, mix=mix,
                                replay_options=None if args.replay_like is None else replay_options(args.replay_like))
    except (ValueError, FileExistsError, NextStepError) as e:
        p.exit(2, f"concept_dataset.py: {e}\n")
    records = [json.loads(line) for line in index.read_text().splitlines()]
    counts = Counter(r["spec"]["category"] if "spec" in r else "replay" for r in records)
    print(f"{index}: {len(records)} samples ({', '.join(f'{c} {n}' for c, n in sorted(counts.items()))}); e.g. "
          + "; ".join(repr(r["caption"]) for r in records[:3]))


if __name__ == "__main__":
    main()
