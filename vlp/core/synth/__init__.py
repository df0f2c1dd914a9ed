"""Synthetic image/caption pairs: coloured shapes with counts, attributes and relations.

Why this exists: no data set can be downloaded here, yet the project has to
train and evaluate a CLIP end to end. Shapes on a plain background are the
smallest world in which a tiny model, trained on 2 CPU cores in minutes, can
learn something measurable, and in which every caption has a known truth
value: counting ("three red circles"), attribute binding ("a red circle and a
blue square" vs its colour swap) and spatial relations ("... to the left of
...") can be scored against ground truth instead of human labels.

The pieces are separate so that eval sets and hard negatives can reuse them:

    world.sample_scene(rng, kind, **constraints) -> Scene   what is in the picture
    render.render(scene, size)                    -> image   how it looks
    language.describe(scene, rng)                 -> Statement, its .text() is the caption
    language.counterfactuals(scene, rng)          -> false captions in the same phrasing

The shard builder's `vlp shards synth` (vlp.data_tools.synth) writes training
pairs from these; the eval package (vlp.eval.synthetic) writes benchmark sets.
This package re-exports the public names of its three modules.

Coordinates are fractions of the image, origin top-left, y growing downwards,
so "above" means a smaller y.
"""

from vlp.core.synth.language import Phrase, Statement, caption, counterfactuals, describe
from vlp.core.synth.render import render
from vlp.core.synth.world import (
    COLOURS,
    GAP,
    INVERSE_RELATION,
    KIND_WEIGHTS,
    KINDS,
    MARGIN,
    MAX_COUNT,
    MAX_TRAIN_COUNT,
    NUMBER_WORDS,
    PLURALS,
    REL_MAX_SLOPE,
    REL_MIN_DIST,
    RELATIONS,
    SHAPES,
    WORD_TO_NUMBER,
    Obj,
    Scene,
    item_rng,
    number_word,
    sample_scene,
    spatial_relation,
)

__all__ = [
    "COLOURS", "GAP", "INVERSE_RELATION", "KIND_WEIGHTS", "KINDS", "MARGIN", "MAX_COUNT", "MAX_TRAIN_COUNT",
    "NUMBER_WORDS", "PLURALS", "REL_MAX_SLOPE", "REL_MIN_DIST", "RELATIONS", "SHAPES", "WORD_TO_NUMBER",
    "Obj", "Phrase", "Scene", "Statement", "caption", "counterfactuals", "describe", "item_rng",
    "number_word", "render", "sample_scene", "spatial_relation",
]
