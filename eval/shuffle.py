"""ARO's word-order perturbations (COCO-Order / Flickr-Order), without spaCy or nltk.

ARO builds, for each test caption, four shuffled versions, and a model is right
if it prefers the original:

- shuffle_nouns_and_adj: nouns permuted among the noun slots, adjectives
  among the adjective slots;
- shuffle_allbut_nouns_and_adj: every other token permuted among its slots;
- shuffle_within_trigrams: tokens permuted inside each consecutive trigram;
- shuffle_trigrams: the trigrams themselves permuted.

ARO tokenises with spaCy / nltk and takes nouns and adjectives from spaCy's
tagger. Here, on purpose, there are no such dependencies:

Tokenisation (`tokenize`): words are runs of letters/digits, keeping an
inner apostrophe ("man's", "don't" stay whole; nltk would split them); every
other non-space character is a token of its own. Close to nltk's
word_tokenize on caption text, which is mostly plain words.

Tagging (`HeuristicTagger`): a documented heuristic, not a POS tagger. A
token is an adjective if it is in a small lexicon (colours, sizes, ages,
materials, common descriptive words, and words ending in -ful/-ous/-ive/-ish/
-less/-able), a noun if it is any other alphabetic word that is not a
closed-class word (determiners, pronouns, prepositions, conjunctions,
auxiliaries, number words), not an -ing/-ly form and not in a short list of
frequent caption verbs. On COCO-style captions this finds the nouns and
colour/size adjectives that the nouns+adj shuffle is about; it mislabels some
words (a verb it does not know is taken for a noun). For exact figures,
precompute the shuffles with spaCy elsewhere and give them to the
`aro_order` task as a `precomputed` file: that path involves no tagging here.

The two trigram shuffles need no tagging at all. Every function takes a
`random.Random`, so the perturbations are reproducible from a seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[^\w\s]|_", re.UNICODE)

CLOSED_CLASS = frozenset(
    """
    a an the this that these those some any each every no all both either neither another such
    i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
    one ones someone something somebody anyone anything nothing everyone everything who whom whose which what
    of in on at by for with without from to into onto over under above below between among through across
    along around behind beside besides near next up down out off about against toward towards upon within
    inside outside beneath underneath beyond during before after since until via per like as than
    and or but nor so yet if while because though although whether then there here where when how why
    is are was were be been being am do does did have has had having can could will would shall should
    may might must not very too also just only still even really almost quite rather
    two three four five six seven eight nine ten eleven twelve twenty hundred dozen several many few much more most
    """.split()
)
COMMON_VERBS = frozenset(
    """
    sits sit sat stands stand stood holds hold held looks look rides ride lays lay lies lie eats eat ate
    walks walk plays play flies fly waits wait shows show contains contain filled covered parked topped
    made sitting standing holding looking riding laying lying eating walking playing flying waiting
    """.split()
)
ADJECTIVES = frozenset(
    """
    red green blue yellow purple orange pink brown black white gray grey silver golden gold dark light bright pale
    big small large little huge tiny giant tall short long wide narrow thick thin fat round square flat
    young old new older elderly ancient modern wooden metal plastic glass stone leather wet dry hot cold warm
    clean dirty empty full open closed busy quiet pretty beautiful ugly cute happy sad fresh ripe raw cooked
    many several different other same various colorful single double multiple high low top bottom front back
    left right middle upper lower outdoor indoor public private professional
    """.split()
)
_ADJ_SUFFIXES = ("ful", "ous", "ive", "ish", "less", "able", "ible")
PERTURBATIONS: tuple[str, ...] = (
    "shuffle_nouns_and_adj",
    "shuffle_allbut_nouns_and_adj",
    "shuffle_within_trigrams",
    "shuffle_trigrams",
)


def tokenize(text: str) -> list[str]:
    """Words (with inner apostrophes) and single punctuation marks, in order."""
    return _TOKEN.findall(text)


class HeuristicTagger:
    """Tags tokens 'NOUN', 'ADJ' or 'OTHER' by the rules in the module docstring.

    `extra_nouns` / `extra_adjectives` let a caller with a known vocabulary
    (the synthetic shapes world) make the heuristic exact for it.
    """

    def __init__(
        self, extra_nouns: frozenset[str] = frozenset(), extra_adjectives: frozenset[str] = frozenset()
    ):
        self.extra_nouns = extra_nouns
        self.extra_adjectives = extra_adjectives

    def tag(self, token: str) -> str:
        word = token.lower()
        if word in self.extra_adjectives:
            return "ADJ"
        if word in self.extra_nouns:
            return "NOUN"
        if not word.isalpha() or word in CLOSED_CLASS or word in COMMON_VERBS:
            return "OTHER"
        if word in ADJECTIVES or (len(word) > 5 and word.endswith(_ADJ_SUFFIXES)):
            return "ADJ"
        if word.endswith("ly") or (len(word) > 4 and word.endswith("ing")):
            return "OTHER"
        return "NOUN"


def _permute_slots(tokens: list[str], slots: list[int], rng: random.Random) -> None:
    values = [tokens[i] for i in slots]
    rng.shuffle(values)
    for i, v in zip(slots, values, strict=True):
        tokens[i] = v


def shuffle_nouns_and_adj(text: str, rng: random.Random, tagger: HeuristicTagger) -> str:
    """Nouns permuted among noun slots, adjectives among adjective slots."""
    tokens = tokenize(text)
    tags = [tagger.tag(t) for t in tokens]
    for kind in ("NOUN", "ADJ"):
        _permute_slots(tokens, [i for i, t in enumerate(tags) if t == kind], rng)
    return " ".join(tokens)


def shuffle_allbut_nouns_and_adj(text: str, rng: random.Random, tagger: HeuristicTagger) -> str:
    """Every token that is not a noun or adjective permuted among those slots."""
    tokens = tokenize(text)
    _permute_slots(tokens, [i for i, t in enumerate(tokens) if tagger.tag(t) == "OTHER"], rng)
    return " ".join(tokens)


def trigrams(tokens: list[str]) -> list[list[str]]:
    """Consecutive groups of three tokens (the last may be shorter)."""
    return [tokens[i : i + 3] for i in range(0, len(tokens), 3)]


def shuffle_within_trigrams(text: str, rng: random.Random, tagger: HeuristicTagger | None = None) -> str:
    """Tokens permuted inside each trigram; the trigrams keep their order."""
    groups = trigrams(tokenize(text))
    for g in groups:
        rng.shuffle(g)
    return " ".join(t for g in groups for t in g)


def shuffle_trigrams(text: str, rng: random.Random, tagger: HeuristicTagger | None = None) -> str:
    """The trigrams permuted; tokens inside each keep their order."""
    groups = trigrams(tokenize(text))
    rng.shuffle(groups)
    return " ".join(t for g in groups for t in g)


_FUNCTIONS: dict[str, Callable[..., str]] = {
    "shuffle_nouns_and_adj": shuffle_nouns_and_adj,
    "shuffle_allbut_nouns_and_adj": shuffle_allbut_nouns_and_adj,
    "shuffle_within_trigrams": shuffle_within_trigrams,
    "shuffle_trigrams": shuffle_trigrams,
}


def perturb_all(text: str, rng: random.Random, tagger: HeuristicTagger | None = None) -> dict[str, str]:
    """The four ARO perturbations of `text`, by name, drawn from `rng` in a fixed order."""
    tagger = tagger or HeuristicTagger()
    return {name: _FUNCTIONS[name](text, rng, tagger) for name in PERTURBATIONS}


def pre_caption(caption: str, max_words: int = 30) -> str:
    """The caption normalisation ARO applies to originals and shuffles alike (BLIP's `pre_caption`):
    lower case, the characters . ! " ( ) * # : ; ~ turned into spaces, spaces collapsed, at most max_words words."""
    text = re.sub(r"[.!\"()*#:;~]", " ", caption.lower())
    text = re.sub(r"\s{2,}", " ", text).strip()
    words = text.split(" ")
    return " ".join(words[:max_words])
