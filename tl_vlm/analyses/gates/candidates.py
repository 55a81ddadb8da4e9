"""The candidates of a gate search: position classes and single image-side positions.

Classes are what the layout defines: ``boi``, ``first_image`` and ``last_image`` (the
first and last content token of each image), ``image`` (all content tokens), ``eoi``,
``gate`` (when it differs from EOI: Emu3's EOI + EOF), ``row_breaks``, ``specials``, each
image row ``row r`` (its content tokens), and ``image_side`` (all of them: the
reference). Single positions are named by their role: ``boi``, ``image (r, c)``, ``eoi``,
``row break k``, ``special k`` (``#n`` for the n-th image).

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> pos = model.prepare(make_examples(1).prompts).positions
    >>> [role_label(role) for role, _ in position_roles(pos, 0)][-3:]
    ['image (5, 4)', 'image (5, 5)', 'eoi']
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from tl_vlm.core.positions import ImagePositions, PositionSet

Key = tuple  # a single position's role: ("boi", n), ("image", image, row, col), ...
#: the reference class: every image-side position
IMAGE_SIDE = "image_side"


def _image_row(pos: ImagePositions, row: int) -> PositionSet:
    """The content tokens in grid row ``row`` of every image."""
    rows = []
    for b, grid in enumerate(pos.grid):
        content = pos.image[b]
        rows.append(content[(grid[:, 1] == row).to(content.device)].tolist() if grid.numel() else [])
    return PositionSet.from_lists(rows, pos.seq_len)


def candidate_classes(pos: ImagePositions, rows: bool = True) -> dict[str, PositionSet]:
    """The position classes of a batch that are not empty in every example.

    ``image_side`` first (the reference), then the layout's classes and, with ``rows``,
    each image row. Two classes may hold the same positions (the toy's ``gate`` is its
    ``eoi``); :func:`~tl_vlm.analyses.gates.find_gates` knocks such a set out once.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pos = model.prepare(make_examples(2).prompts).positions
        >>> list(candidate_classes(pos, rows=False))
        ['image_side', 'boi', 'first_image', 'last_image', 'image', 'eoi', 'gate']
        >>> candidate_classes(pos)["row 5"].tolist()[0]
        [32, 33, 34, 35, 36, 37]
    """
    pos = pos.to("cpu")
    named = {IMAGE_SIDE: pos.image_side, "boi": pos.boi, "first_image": pos.first_image,
             "last_image": pos.last_image, "image": pos.image, "eoi": pos.eoi,
             "gate": pos.gate, "row_breaks": pos.row_breaks, "specials": pos.specials}
    if rows:
        n_rows = max((int(g[:, 1].max()) + 1 for g in pos.grid if g.numel()), default=0)
        named.update({f"row {r}": _image_row(pos, r) for r in range(n_rows)})
    return {name: s for name, s in named.items() if not s.is_empty()}


def position_roles(pos: ImagePositions, example: int) -> list[tuple[Key, int]]:
    """``(role, position)`` of every image-side position of one example, in order.

    Content tokens are ``("image", image, row, col)``; the others ``(kind, n)``, the n-th
    of that kind in the example (kinds: ``boi``, ``row_break``, ``eoi``, ``special``).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pos = model.prepare(make_examples(2).prompts).positions
        >>> roles = position_roles(pos, 0)
        >>> roles[:2], roles[-1], [role_label(r) for r, _ in roles[:2]]
        ([(('boi', 0), 1), (('image', 0, 0, 0), 2)], (('eoi', 0), 38), ['boi', 'image (0, 0)'])
    """
    pos = pos.to("cpu")
    cells = {int(p): tuple(int(v) for v in pos.grid[example][i].tolist())
             for i, p in enumerate(pos.image[example].tolist())}
    kinds = (("boi", pos.boi), ("row_break", pos.row_breaks), ("eoi", pos.eoi),
             ("special", pos.specials))
    seen: Counter = Counter()
    out = []
    for p in pos.image_side[example].tolist():
        if p in cells:
            out.append((("image",) + cells[p], p))
            continue
        kind = next(k for k, s in kinds if s.mask[example, p])
        out.append(((kind, seen[kind]), p))
        seen[kind] += 1
    return out


def role_label(key: Key, several_images: bool = False) -> str:
    """A readable name of a single position's role.

    Example:
        >>> role_label(("image", 0, 2, 5)), role_label(("image", 1, 2, 5), several_images=True)
        ('image (2, 5)', 'image 1 (2, 5)')
        >>> role_label(("eoi", 0)), role_label(("eoi", 1)), role_label(("row_break", 3))
        ('eoi', 'eoi #1', 'row break 3')
    """
    if key[0] == "image":
        _, image, row, col = key
        return f"image {image} ({row}, {col})" if several_images else f"image ({row}, {col})"
    kind, n = key
    if kind in ("boi", "eoi"):
        return kind if n == 0 else f"{kind} #{n}"
    return f"{kind.replace('_', ' ')} {n}"


def contribution_groups() -> dict[str, Callable[[ImagePositions], PositionSet]]:
    """A partition of the image side fine enough to read every class's share off it
    (:data:`CLASS_GROUPS`: the groups each class is made of): the gate beyond EOI
    (Emu3's EOF) and the first content token apart.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> pos = model.prepare(make_examples(2).prompts).positions
        >>> groups = {name: group(pos) for name, group in contribution_groups().items()}
        >>> {name: s.counts.tolist() for name, s in groups.items() if not s.is_empty()}
        {'eoi': [1, 1], 'boi': [1, 1], 'first_image': [1, 1], 'last_image': [1, 1],
         'image_rest': [34, 34]}
    """
    def first_only(p: ImagePositions) -> PositionSet:
        return p.first_image - p.gate

    def last_only(p: ImagePositions) -> PositionSet:
        return p.last_image - p.first_image - p.gate

    return {
        "eoi": lambda p: p.eoi,
        "gate_extra": lambda p: p.gate - p.eoi,
        "boi": lambda p: p.boi - p.gate,
        "first_image": first_only,
        "last_image": last_only,
        "image_rest": lambda p: p.image - p.first_image - p.last_image - p.gate,
        "row_breaks": lambda p: p.row_breaks - p.gate,
        "specials_rest": lambda p: p.specials - p.gate - p.eoi - p.boi - p.row_breaks,
    }


#: class -> the contribution groups it is made of (None: all of them)
CLASS_GROUPS = {
    IMAGE_SIDE: None,
    "eoi": ("eoi",), "gate": ("eoi", "gate_extra"), "boi": ("boi",),
    "first_image": ("first_image",), "last_image": ("last_image",),
    "image": ("first_image", "last_image", "image_rest"), "row_breaks": ("row_breaks",),
    "specials": ("gate_extra", "specials_rest"),
}


#: the classes whose neighbourhood overlap with the labels is measured
OVERLAP_CLASSES = ("boi", "first_image", "last_image", "image", "eoi", "gate", "row_breaks",
                   "specials")
