"""The toy image-understanding task: a 6x6 grid of VQ codes, a question, a one-word answer.

An "image" is a 6x6 grid of discrete codes from a 24-entry codebook, written the way a
native model (Chameleon) sees an image: ``<racm3:break>`` (BOI), the 36 code tokens
read row-major (``IMGIMG...Z`` vocabulary entries, one token per code), ``<eoss>`` (EOI).

- Codes 0-7 are background texture, drawn uniformly at random for every cell.
- One object sits in a 3x3 block in one of the four quadrants (its *position*). The
  cells of its *shape* (a 3x3 pattern: ``square`` ring, ``plus``, ``x``, ``triangle``)
  take the code of a piece of that shape in its *colour* (``red``, ``green``, ``blue``,
  ``yellow``): ``8 + 4 * shape + colour`` (like a VQ code, which stands for a local patch
  of a given look); the other cells of the block stay background.

The question asks for one attribute (``colour``, ``shape`` or ``position``; two
wordings each) and the answer is one word out of four. Attributes are independent of
each other and of the question wording, and :func:`make_examples` balances every
question type's answers exactly (for ``n`` a multiple of 12), so the answer cannot be
guessed from the question: chance is 1/4 per question type (see :func:`chance_level`).

Prompts are plain strings (``model.prepare(prompts)`` takes them, no images); the
processor appends Chameleon's separator ``<reserved08706>`` and the answer is the next
token.

Example:
    >>> from tl_vlm.toy.task import make_examples
    >>> data = make_examples(12, seed=0)
    >>> len(data), data.questions[:3], sorted(set(data.labels))
    (12, ['colour', 'shape', 'position'], [0, 1, 2, 3])
    >>> data[0].prompt.split()[:2], len(data[0].prompt.split())   # BOI, 36 codes, EOI, question
    (['<racm3:break>', 'IMGIMGFZ'], 41)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Union

import numpy as np

GRID = 6            # image side in codes
BLOCK = 3           # object side in codes
N_BACKGROUND = 8    # background codes 0..7
N_CODES = 24        # codebook: 8 background + 4 shapes x 4 colours
BOI, EOI, SEP = "<racm3:break>", "<eoss>", "<reserved08706>"

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "plus", "x", "triangle")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
ANSWERS = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
QUESTION_TYPES = tuple(ANSWERS)
TEMPLATES = {
    "colour": ("what colour is the object ?", "which colour ?"),
    "shape": ("what shape is the object ?", "which shape ?"),
    "position": ("where is the object ?", "which corner ?"),
}
_PATTERNS = {   # 3x3 cells of each shape, row-major
    "square": ["###", "#.#", "###"],
    "plus": [".#.", "###", ".#."],
    "x": ["#.#", ".#.", "#.#"],
    "triangle": ["#..", "##.", "###"],
}
SHAPE_CELLS = {name: [(r, c) for r in range(BLOCK) for c in range(BLOCK) if rows[r][c] == "#"]
               for name, rows in _PATTERNS.items()}

# Independent random streams: training batches and evaluation sets never share draws.
TRAIN_STREAM, EVAL_STREAM, PAIR_STREAM = 1, 2, 3
DEFAULT_EVAL_SEED = 1000


def code_token(code: int) -> str:
    """Chameleon's vocabulary name of VQ code ``code``: its digits as letters A-J.

    Example:
        >>> code_token(0), code_token(23)
        ('IMGIMGAZ', 'IMGIMGCDZ')
    """
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary() -> list[str]:
    """Every word of the task, in the order the toy tokenizer numbers them.

    ``<unk> <s> </s> <pad>``, the four Chameleon specials, the question and answer
    words, then the 24 code tokens.

    Example:
        >>> words = vocabulary()
        >>> len(words), words[5:8], words[-1]
        (54, ['<racm3:break>', '<eoss>', '<reserved08706>'], 'IMGIMGCDZ')
    """
    words: list[str] = []
    for t in TEMPLATES.values():
        for q in t:
            words += [w for w in q.split() if w not in words]
    answers = [a for v in ANSWERS.values() for a in v]
    return ["<unk>", "<s>", "</s>", "<pad>", "<image>", BOI, EOI, SEP,
            *[w for w in words if w not in answers], *answers,
            *[code_token(i) for i in range(N_CODES)]]


_VOCAB = {w: i for i, w in enumerate(vocabulary())}


def token_id(word: str) -> int:
    """Id of a task word in the toy tokenizer (equal to the shipped tokenizer's).

    Example:
        >>> token_id("red"), token_id(EOI), token_id(code_token(0))
        (18, 6, 30)
    """
    return _VOCAB[word]


@dataclass(frozen=True)
class ToyImage:
    """One image: its attributes (indices into ``COLOURS``, ``SHAPES``, ``POSITIONS``) and
    its 36 codes (row-major).

    Example:
        >>> img = draw_image(colour=0, shape=SHAPES.index("triangle"), position=3,
        ...                  background=[0] * 36)
        >>> print(img.render())                 # a red triangle, bottom-right
        .. .. .. .. .. ..
        .. .. .. .. .. ..
        .. .. .. .. .. ..
        .. .. .. tr .. ..
        .. .. .. tr tr ..
        .. .. .. tr tr tr
        >>> img.label("colour"), img.tokens.split()[:2], len(img.tokens.split())
        (0, ['<racm3:break>', 'IMGIMGAZ'], 38)
    """

    colour: int
    shape: int
    position: int
    codes: tuple[int, ...]

    def label(self, question: str) -> int:
        return getattr(self, question)

    @property
    def tokens(self) -> str:
        """``<racm3:break> IMGIMG..Z x 36 <eoss>``."""
        return " ".join([BOI, *(code_token(c) for c in self.codes), EOI])

    def render(self) -> str:
        """The grid as text, one row per line (object codes as shape initial + colour
        initial, e.g. ``tr`` for a red triangle piece; ``..`` for background)."""
        def cell(c: int) -> str:
            if c < N_BACKGROUND:
                return ".."
            shape, colour = divmod(c - N_BACKGROUND, 4)
            return SHAPES[shape][0] + COLOURS[colour][0]

        return "\n".join(" ".join(cell(c)
                                  for c in self.codes[r * GRID:(r + 1) * GRID])
                         for r in range(GRID))


def object_code(colour: int, shape: int) -> int:
    """The VQ code of a piece of the object: ``8 + 4 * shape + colour``.

    Example:
        >>> object_code(COLOURS.index("red"), SHAPES.index("triangle"))
        20
    """
    return N_BACKGROUND + 4 * shape + colour


def draw_image(colour: int, shape: int, position: int, background: Sequence[int]) -> ToyImage:
    """The image of given attributes over a 36-cell background.

    Example:
        >>> img = draw_image(colour=1, shape=SHAPES.index("plus"), position=0,
        ...                  background=[0] * 36)
        >>> img.codes[:GRID], POSITIONS[img.position]       # the first row: one plus piece
        ((0, 13, 0, 0, 0, 0), 'top-left')
    """
    codes = list(background)
    top, left = (position // 2) * BLOCK, (position % 2) * BLOCK
    for r, c in SHAPE_CELLS[SHAPES[shape]]:
        codes[(top + r) * GRID + left + c] = object_code(colour, shape)
    return ToyImage(colour, shape, position, tuple(codes))


def random_image(rng: np.random.Generator, colour: Optional[int] = None,
                 shape: Optional[int] = None, position: Optional[int] = None) -> ToyImage:
    """An image with the given attributes (random where None).

    Example:
        >>> img = random_image(np.random.default_rng(0), colour=2)
        >>> COLOURS[img.colour], len(img.codes)
        ('blue', 36)
    """
    colour = int(rng.integers(4)) if colour is None else colour
    shape = int(rng.integers(4)) if shape is None else shape
    position = int(rng.integers(4)) if position is None else position
    background = rng.integers(N_BACKGROUND, size=GRID * GRID).tolist()
    return draw_image(colour, shape, position, background)


@dataclass(frozen=True)
class ToyExample:
    """An image, a question about one attribute, and the answer.

    Attributes:
        question: ``"colour"``, ``"shape"`` or ``"position"``.
        template: index of the question's wording in ``TEMPLATES[question]``.
        label: the answer's class index (0..3) within the question type.

    Example:
        >>> img = draw_image(0, SHAPES.index("triangle"), 3, background=[0] * 36)
        >>> ex = ToyExample(img, "shape")
        >>> ex.label, ex.answer, ex.answer_id, ex.question_text
        (3, 'triangle', 25, 'what shape is the object ?')
        >>> ex.prompt.split()[-7:]
        ['<eoss>', 'what', 'shape', 'is', 'the', 'object', '?']
    """

    image: ToyImage
    question: str
    template: int = 0

    @property
    def label(self) -> int:
        return self.image.label(self.question)

    @property
    def answer(self) -> str:
        return ANSWERS[self.question][self.label]

    @property
    def answer_id(self) -> int:
        return token_id(self.answer)

    @property
    def question_text(self) -> str:
        return TEMPLATES[self.question][self.template]

    @property
    def prompt(self) -> str:
        """The model's input text: image tokens, then the question."""
        return f"{self.image.tokens} {self.question_text}"


class ToyDataset(Sequence[ToyExample]):
    """A list of examples with the columns an evaluation needs.

    Example:
        >>> data = make_examples(24, seed=1)
        >>> data.answers[:3], data.answer_ids[:3], data.candidate_ids[0]
        (['red', 'square', 'top-left'], [18, 22, 26], [18, 19, 20, 21])
        >>> len(data[:5]), len(data.of_question("colour")), data.questions[:2]
        (5, 8, ['colour', 'shape'])
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> model.prepare(data.prompts).input_ids.shape              # no images: codes are tokens
        torch.Size([24, 46])
    """

    def __init__(self, examples: Sequence[ToyExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return ToyDataset(self.examples[i])
        return self.examples[i]

    def __iter__(self) -> Iterator[ToyExample]:
        return iter(self.examples)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    @property
    def answers(self) -> list[str]:
        return [e.answer for e in self.examples]

    @property
    def answer_ids(self) -> list[int]:
        """Token id of each example's answer."""
        return [e.answer_id for e in self.examples]

    @property
    def labels(self) -> list[int]:
        """Class index (0..3) of each answer within its question type."""
        return [e.label for e in self.examples]

    @property
    def questions(self) -> list[str]:
        return [e.question for e in self.examples]

    @property
    def candidate_ids(self) -> list[list[int]]:
        """The four answer token ids of each example's question type (label order)."""
        return [[token_id(a) for a in ANSWERS[e.question]] for e in self.examples]

    def of_question(self, question: str) -> "ToyDataset":
        return ToyDataset([e for e in self.examples if e.question == question])


def chance_level(data: Union[ToyDataset, Sequence[ToyExample]]) -> float:
    """Accuracy of the best question-only guesser: per question type, always answer
    its most frequent answer; averaged over examples. 0.25 for balanced sets.

    Example:
        >>> chance_level(make_examples(24)), chance_level(make_examples(24)[:5])
        (0.25, 0.6)
    """
    total = 0
    for q in QUESTION_TYPES:
        labels = [e.label for e in data if e.question == q]
        if labels:
            total += max(labels.count(k) for k in range(4))
    return total / len(data)


def _balanced(rng: np.random.Generator, n: int, k: int = 4) -> list[int]:
    """``n`` labels in 0..k-1, as equal in count as possible, shuffled."""
    labels = [i % k for i in range(n)]
    return [labels[i] for i in rng.permutation(n)]


def make_examples(n: int, seed: int = DEFAULT_EVAL_SEED,
                  questions: Sequence[str] = QUESTION_TYPES,
                  stream: int = EVAL_STREAM) -> ToyDataset:
    """``n`` examples, question types in turn, each type's answers balanced.

    Deterministic given ``(n, seed, questions, stream)``. Evaluation sets use
    ``stream=EVAL_STREAM`` (the default) and training batches ``TRAIN_STREAM``, so the
    two never coincide whatever the seeds.

    Example:
        >>> data = make_examples(12, seed=0, questions=["colour"])
        >>> set(data.questions), sorted(data.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        ({'colour'}, True)
        >>> make_examples(12, seed=0).prompts == make_examples(12, seed=0).prompts
        True
        >>> make_examples(4, questions=["size"])
        Traceback (most recent call last):
        ...
        ValueError: unknown question type 'size'; choose from ('colour', 'shape', 'position')
    """
    rng = np.random.default_rng([stream, seed])
    questions = list(questions)
    for q in questions:
        if q not in ANSWERS:
            raise ValueError(f"unknown question type {q!r}; choose from {QUESTION_TYPES}")
    types = [questions[i % len(questions)] for i in range(n)]
    labels = {q: iter(_balanced(rng, types.count(q))) for q in questions}
    out = []
    for q in types:
        attrs = {q: next(labels[q])}
        image = random_image(rng, **attrs)
        out.append(ToyExample(image, q, int(rng.integers(len(TEMPLATES[q])))))
    return ToyDataset(out)


@dataclass(frozen=True)
class ToyPair:
    """Two examples with the same question and background that differ only in the
    asked attribute (for activation patching: run ``source``, patch into ``target``).

    Example:
        >>> pair = make_pairs(1, seed=0)[0]
        >>> pair.source.question, pair.source.answer, pair.target.answer
        ('colour', 'blue', 'yellow')
        >>> len(pair.source.prompt.split()) == len(pair.target.prompt.split())   # same layout
        True
    """

    source: ToyExample
    target: ToyExample


def make_pairs(n: int, seed: int = DEFAULT_EVAL_SEED,
               questions: Sequence[str] = QUESTION_TYPES) -> list[ToyPair]:
    """``n`` (source, target) pairs whose answers differ; question types in turn.

    Within a pair, the background and the two attributes not asked about
    are equal; the asked attribute differs (all 12 ordered pairs of values equally
    often when ``n`` is a multiple of 36).

    Example:
        >>> p = make_pairs(3, seed=0)[2]
        >>> p.source.question, p.source.answer != p.target.answer
        ('position', True)
    """
    rng = np.random.default_rng([PAIR_STREAM, seed])
    value_pairs = [(a, b) for a in range(4) for b in range(4) if a != b]
    out = []
    orders = {q: [] for q in questions}
    for i in range(n):
        q = questions[i % len(questions)]
        if not orders[q]:
            orders[q] = [value_pairs[j] for j in rng.permutation(len(value_pairs))]
        a, b = orders[q].pop()
        attrs = {k: int(rng.integers(4)) for k in QUESTION_TYPES}
        background = rng.integers(N_BACKGROUND, size=GRID * GRID).tolist()
        source_img = draw_image(**{**attrs, q: a}, background=background)
        target_img = draw_image(**{**attrs, q: b}, background=background)
        template = int(rng.integers(len(TEMPLATES[q])))
        out.append(ToyPair(ToyExample(source_img, q, template), ToyExample(target_img, q, template)))
    return out


def batch_examples(rng: np.random.Generator, n: int) -> list[ToyExample]:
    """``n`` i.i.d. training examples (uniform question type, attributes, wording).

    Example:
        >>> rng = np.random.default_rng([TRAIN_STREAM, 0])
        >>> [ex.question for ex in batch_examples(rng, 3)]
        ['shape', 'position', 'position']
    """
    out = []
    for _ in range(n):
        q = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
        out.append(ToyExample(random_image(rng), q, int(rng.integers(len(TEMPLATES[q])))))
    return out


def with_question(example: ToyExample, question: str, template: int = 0) -> ToyExample:
    """The same image asked another question.

    Example:
        >>> ex = make_examples(1, seed=0)[0]
        >>> other = with_question(ex, "position", template=1)
        >>> other.image == ex.image, other.question_text
        (True, 'which corner ?')
    """
    return replace(example, question=question, template=template)
