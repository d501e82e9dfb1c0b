"""The grounded shapes world: a procedural scene generator with exact ground truth.

No public GLIPv2 weights exist, so the project trains on scenes rendered from the specification in
`WORLD.md` (kept in `shared/`). The generator follows that page exactly and is organised in layers,
one module each:

- `vocabulary`: `SHAPES`, `COLORS`, `SIZES`, `RELATIONS`, the 24-answer VQA set `ANSWERS`, the
  spec's numbers and the held-out pairs (`parse_pairs`);
- `scene`: the data classes `WorldObject` and `WorldImage`;
- `geometry`: `shape_extent`, `shape_vertices` (a shape's outline relative to its tight-box
  corner) and `rasterize` (5x5 supersampled coverage; mask = pixels at least half covered);
- `render`: `render_scene` (background, objects, placement with margins and gaps), `render_index`;
- `language`: `relation_holds`, `expression_targets`, `referent_form`, `answer_question`,
  `caption_for`;
- `sampling`: the samplers that turn a scene into referring expressions and VQA pairs, and
  `present_expressions` / `empty_expressions` (every expression with referents; the nearest
  misses of each form naming nothing);
- `dataset`: `to_record`, `read_records`, `objects_from_record`, `generate_world`.

`records` (not re-exported here) turns the written records into training samples.

Box convention everywhere: `[x0, y0, x1, y1]` in pixels, integers, end exclusive.
Held-out pairs are `(colour, shape)` tuples, e.g. `("red", "circle")`.
"""

from model_export.data.world.dataset import (
    generate_world,
    objects_from_record,
    read_records,
    to_record,
)
from model_export.data.world.geometry import rasterize, shape_extent, shape_vertices, tight_box
from model_export.data.world.language import (
    EMPTY_FORMS,
    EXPRESSION_FORMS,
    QUESTION_TYPES,
    RELATION_ABSENT_ANCHOR,
    answer_question,
    caption_for,
    caption_phrase_spans,
    expression_form,
    expression_targets,
    referent_form,
    related,
    relation_anchor,
    relation_holds,
    relation_parts,
    select,
    unique_anchor,
)
from model_export.data.world.render import render_index, render_scene
from model_export.data.world.sampling import (
    ExpressionGroup,
    empty_expressions,
    present_expressions,
    relation_contrasts,
    sample_expressions,
    sample_questions,
)
from model_export.data.world.scene import WorldImage, WorldObject
from model_export.data.world.vocabulary import (
    ANSWER_INDEX,
    ANSWERS,
    COLOR_NAMES,
    COLORS,
    HELD_OUT_PAIRS,
    MAX_COUNT,
    RELATIONS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    Pairs,
    parse_pairs,
    validate_pairs,
)

__all__ = [
    "ANSWERS",
    "ANSWER_INDEX",
    "COLORS",
    "COLOR_NAMES",
    "EMPTY_FORMS",
    "EXPRESSION_FORMS",
    "HELD_OUT_PAIRS",
    "MAX_COUNT",
    "QUESTION_TYPES",
    "RELATIONS",
    "RELATION_ABSENT_ANCHOR",
    "SHAPES",
    "SIZES",
    "SIZE_RANGES",
    "ExpressionGroup",
    "Pairs",
    "WorldImage",
    "WorldObject",
    "answer_question",
    "caption_for",
    "caption_phrase_spans",
    "empty_expressions",
    "expression_form",
    "expression_targets",
    "generate_world",
    "objects_from_record",
    "parse_pairs",
    "present_expressions",
    "rasterize",
    "read_records",
    "referent_form",
    "related",
    "relation_anchor",
    "relation_contrasts",
    "relation_holds",
    "relation_parts",
    "render_index",
    "render_scene",
    "sample_expressions",
    "sample_questions",
    "select",
    "shape_extent",
    "shape_vertices",
    "tight_box",
    "to_record",
    "unique_anchor",
    "validate_pairs",
]
