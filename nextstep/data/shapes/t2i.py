"""Text-to-image samples of the shapes world, mirroring GenEval: six ``CATEGORIES`` of caption, each with the spec
it states and a scene that satisfies it (``generate_t2i``). Each category words its captions several ways, so a
model must read the wording rather than one memorised sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .scene import COLORS, DEFAULT_BACKGROUND, RELATIONS, SHAPES, Scene, _choice, scene_for_spec

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
COUNT_WORDS: Mapping[int, str] = MappingProxyType({2: "two", 3: "three", 4: "four"})


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "an orange circle", "a circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _want(shape: str | None = None, color: str | None = None) -> dict[str, str | None]:
    return {"shape": shape, "color": color}


# Templates: (format string, whether it names the background). Fields are filled by each category's function.
_ON_WHITE = " on a white background"
SINGLE_OBJECT_TEMPLATES = (("{obj}", False), ("one {bare}", False), ("{obj}" + _ON_WHITE, True),
                           ("a single {bare}", False), ("a picture of {obj}", False))
TWO_OBJECTS_TEMPLATES = (("{obj1} and {obj2}", False), ("one {bare1} and one {bare2}", False),
                         ("{obj1} and {obj2}" + _ON_WHITE, True), ("a picture of {obj1} and {obj2}", False),
                         ("{obj1} together with {obj2}", False))
COUNTING_TEMPLATES = (("{count} {plural}", False), ("exactly {count} {plural}", False),
                      ("{count} {plural}" + _ON_WHITE, True), ("a group of {count} {plural}", False),
                      ("a picture of {count} {plural}", False))
COLORS_TEMPLATES = (("{a_color} object", False), ("something {color}", False), ("{a_color} shape", False),
                    ("{a_color} thing" + _ON_WHITE, True), ("an object that is {color}", False))
POSITION_TEMPLATES = (("{obj1} {rel} {obj2}", False), ("{obj1} placed {rel} {obj2}", False),
                      ("there is {obj1} {rel} {obj2}", False), ("{obj1} {rel} {obj2}" + _ON_WHITE, True))
COLOR_ATTRIBUTION_TEMPLATES = (("{obj1} and {obj2}", False), ("one {bare1} and one {bare2}", False),
                               ("{a_shape1} that is {color1} and {a_shape2} that is {color2}", False),
                               ("{obj1} with {obj2}", False), ("{obj1} and {obj2}" + _ON_WHITE, True))
RELATION_PHRASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath"),
})


def _caption(rng: np.random.Generator, templates, spec: dict[str, Any], **fields: str) -> tuple[str, dict]:
    """Fill a random template; a template that names the background adds it to the spec."""
    template, names_background = _choice(rng, templates)
    if names_background:
        spec = {**spec, "background": DEFAULT_BACKGROUND}
    return template.format(**fields), spec


def _single_object(rng: np.random.Generator) -> tuple[str, dict]:
    shape, color = _choice(rng, SHAPES), _choice(rng, COLORS)
    spec = {"category": "single_object", "objects": [_want(shape, color)]}
    bare = f"{color} {shape}"
    return _caption(rng, SINGLE_OBJECT_TEMPLATES, spec, obj=_a(bare), bare=bare)


def _two_objects(rng: np.random.Generator) -> tuple[str, dict]:
    s1, s2 = (str(s) for s in rng.permutation(SHAPES)[:2])
    spec = {"category": "two_objects", "objects": [_want(s1), _want(s2)]}
    return _caption(rng, TWO_OBJECTS_TEMPLATES, spec, obj1=_a(s1), obj2=_a(s2), bare1=s1, bare2=s2)


def _counting(rng: np.random.Generator) -> tuple[str, dict]:
    shape, color, n = _choice(rng, SHAPES), _choice(rng, COLORS), int(rng.integers(2, 5))
    spec = {"category": "counting", "objects": [_want(shape, color) for _ in range(n)]}
    return _caption(rng, COUNTING_TEMPLATES, spec, count=COUNT_WORDS[n], plural=f"{color} {shape}s")


def _colors(rng: np.random.Generator) -> tuple[str, dict]:
    color = _choice(rng, COLORS)
    spec = {"category": "colors", "objects": [_want(color=color)]}
    return _caption(rng, COLORS_TEMPLATES, spec, color=color, a_color=_a(color))


def _position(rng: np.random.Generator) -> tuple[str, dict]:
    s1, s2 = (str(s) for s in rng.permutation(SHAPES)[:2])
    c1, c2 = (_choice(rng, COLORS), _choice(rng, COLORS)) if rng.random() < 0.5 else (None, None)
    relation = _choice(rng, RELATIONS)
    spec = {"category": "position", "objects": [_want(s1, c1), _want(s2, c2)], "relation": relation}
    obj1, obj2 = (_a(f"{c} {s}" if c else s) for c, s in ((c1, s1), (c2, s2)))
    return _caption(rng, POSITION_TEMPLATES, spec, obj1=obj1, obj2=obj2,
                    rel=_choice(rng, RELATION_PHRASES[relation]))


def _color_attribution(rng: np.random.Generator) -> tuple[str, dict]:
    s1, s2 = (str(s) for s in rng.permutation(SHAPES)[:2])
    c1, c2 = (str(c) for c in rng.permutation(COLORS)[:2])
    spec = {"category": "color_attribution", "objects": [_want(s1, c1), _want(s2, c2)]}
    bare1, bare2 = f"{c1} {s1}", f"{c2} {s2}"
    return _caption(rng, COLOR_ATTRIBUTION_TEMPLATES, spec, obj1=_a(bare1), obj2=_a(bare2), bare1=bare1,
                    bare2=bare2, a_shape1=_a(s1), a_shape2=_a(s2), color1=c1, color2=c2)


_CONTENT: Mapping[str, Callable[[np.random.Generator], tuple[str, dict]]] = MappingProxyType({
    "single_object": _single_object,
    "two_objects": _two_objects,
    "counting": _counting,
    "colors": _colors,
    "position": _position,
    "color_attribution": _color_attribution,
})


def generate_t2i(category: str, rng: np.random.Generator, size: int = 64) -> tuple[str, dict, Scene]:
    """One text-to-image sample of ``category``: (caption, spec, scene), the scene satisfying the spec.

    spec: {"category": str, "objects": [{"shape": str | None, "color": str | None}, ...],
           "relation": one of RELATIONS (position only; objects[0] is the subject, objects[1] the reference),
           "background": "white" (only when the caption names it)}.
    An image satisfies it when it shows exactly these objects (None = any), in the relation if one is given.
    """
    if category not in _CONTENT:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    caption, spec = _CONTENT[category](rng)
    return caption, spec, scene_for_spec(spec, rng, size)
