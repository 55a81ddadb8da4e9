"""How recorded predictions are scored: chosen at scoring time, so a run can be re-scored
without its model. Torch-free (the CLI checks the scoring flags before importing torch).

Example:
    >>> Scoring(vqa_normalise="official").to_dict()["vqa_normalise"]
    'official'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scoring:
    """How predictions are scored (chosen at scoring time; a run can be re-scored).

    Attributes:
        vqa_normalise: ``"always"`` (the paper's code, lmms-eval) or ``"official"`` (the
            VQA script: only when the ten answers differ).
        cider: ``"raw"`` (whitespace tokens, the paper's setting), ``"ptb-approx"`` (a
            pure-Python PTB tokenisation) or ``"ptb"`` (Java; falls back to ptb-approx).
        extract: ``"full"`` (the whole continuation, line breaks as spaces: the paper)
            or ``"first_line"``.

    Example:
        >>> Scoring(cider="ptb-approx").to_dict()
        {'vqa_normalise': 'always', 'cider': 'ptb-approx', 'extract': 'full'}
        >>> Scoring(extract="last")
        Traceback (most recent call last):
        ...
        ValueError: extract must be one of ('full', 'first_line'), got 'last'
    """

    vqa_normalise: str = "always"
    cider: str = "raw"
    extract: str = "full"

    def __post_init__(self) -> None:
        from tl_vlm.eval.metrics import NORMALISE_MODES, TOKENIZE_MODES

        for name, allowed in (("vqa_normalise", NORMALISE_MODES), ("cider", TOKENIZE_MODES),
                              ("extract", EXTRACT_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got "
                                 f"{getattr(self, name)!r}")

    def to_dict(self) -> dict[str, str]:
        return {"vqa_normalise": self.vqa_normalise, "cider": self.cider,
                "extract": self.extract}


#: which part of a generated answer is scored
EXTRACT_MODES = ("full", "first_line")
