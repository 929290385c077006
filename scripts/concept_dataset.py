"""Write a concept's small training set: text-to-image samples that name a shape the default shapes world never draws
(``nextstep.data.shapes.concept``), as a folder source (``OUT/images/*.png`` + ``OUT/captions.jsonl``) that a recipe
reads with ``"data": {"source": "folder", "path": OUT}``.

    python scripts/concept_dataset.py star data/star-64 --n 64 --seed 0 [--replay 4000 --repeat 12]

Prints the number of samples per category and three captions.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from nextstep.data.shapes import CONCEPT_SHAPES, concept_dataset


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
    args = p.parse_args()
    try:
        index = concept_dataset(args.concept, args.out, n=args.n, seed=args.seed, size=args.size,
                                replay=args.replay, repeat=args.repeat)
    except (ValueError, FileExistsError) as e:
        p.exit(2, f"concept_dataset.py: {e}\n")
    records = [json.loads(line) for line in index.read_text().splitlines()]
    counts = Counter(r["spec"]["category"] if "spec" in r else "replay" for r in records)
    print(f"{index}: {len(records)} samples ({', '.join(f'{c} {n}' for c, n in sorted(counts.items()))}); e.g. "
          + "; ".join(repr(r["caption"]) for r in records[:3]))


if __name__ == "__main__":
    main()
