"""The procedural shapes world: coloured circles, squares and triangles whose every image can be scored exactly.

    scene.py    the palette, ``Obj`` and ``Scene``, ``render`` (hard edges), masks, boxes and random placement
    t2i.py      text-to-image samples (GenEval): ``generate_t2i(category, rng, size) -> (caption, spec, scene)``,
                six ``CATEGORIES``
    edits.py    editing samples (GEdit / ImgEdit): ``generate_edit(edit_type, rng, size) -> (source, instruction,
                target, spec)``, six ``EDIT_TYPES``
    dataset.py  ``ShapesDataset`` (training), ``data_weights``, and the fixed evaluation sets ``prompt_set`` and
                ``edit_set``
    concept.py  shapes the default world never draws (``CONCEPT_SHAPES``: the star), to teach a trained model:
                ``concept_prompt_set`` (evaluation), ``concept_dataset`` (a small training folder on disk)

A spec is a small JSON-friendly dict that ``nextstep.eval.shapes.check`` / ``check_edit`` verify on any image.
Randomness always comes from an explicit ``numpy.random.Generator``.
"""

from .concept import (
    CONCEPT_CATEGORIES,
    CONCEPT_MIX,
    concept_caption,
    concept_dataset,
    concept_prompt_set,
    concept_sample,
    generate_concept,
)
from .dataset import DEFAULT_MIX, ShapesDataset, data_weights, edit_set, prompt_set
from .edits import DIRECTION_PHRASES, DIRECTION_STEPS, DIRECTIONS, EDIT_BACKGROUNDS, EDIT_TYPES, generate_edit
from .scene import (
    ALL_SHAPES,
    BACKGROUND_COLORS,
    COLORS,
    CONCEPT_SHAPES,
    DEFAULT_BACKGROUND,
    OBJECT_COLORS,
    RELATIONS,
    SHAPES,
    NoRoom,
    Obj,
    Scene,
    object_bbox,
    object_mask,
    relation_offsets,
    render,
    scene_for_spec,
    shape_mask,
    size_range,
)
from .t2i import CATEGORIES, COUNT_WORDS, RELATION_PHRASES, generate_t2i

__all__ = [
    "ALL_SHAPES", "BACKGROUND_COLORS", "CATEGORIES", "COLORS", "CONCEPT_CATEGORIES", "CONCEPT_MIX", "CONCEPT_SHAPES",
    "COUNT_WORDS", "DEFAULT_BACKGROUND", "DEFAULT_MIX", "DIRECTIONS",
    "DIRECTION_PHRASES", "DIRECTION_STEPS", "EDIT_BACKGROUNDS", "EDIT_TYPES", "OBJECT_COLORS", "RELATIONS",
    "RELATION_PHRASES", "SHAPES", "NoRoom", "Obj", "Scene", "ShapesDataset", "concept_caption", "concept_dataset",
    "concept_prompt_set", "concept_sample", "data_weights", "edit_set", "generate_concept",
    "generate_edit", "generate_t2i", "object_bbox", "object_mask", "prompt_set", "relation_offsets", "render",
    "scene_for_spec", "shape_mask", "size_range",
]
