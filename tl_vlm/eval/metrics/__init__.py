"""Task metrics, written from their definitions: VQA accuracy and CIDEr-D.

Pure Python (CIDEr uses only the standard library), no torch, so scores can be
recomputed from recorded predictions anywhere.

Example:
    >>> from tl_vlm.eval.metrics import cider_d, vqa_accuracy
    >>> vqa_accuracy("Two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"])
    0.9
    >>> refs = {1: ["a dog on grass"], 2: ["a red bus"]}
    >>> cider_d({1: "a dog on grass", 2: "a blue car"}, refs).per_image[2]
    0.0
"""

from tl_vlm.eval.metrics.cider import TOKENIZE_MODES, CiderResult, cider_d
from tl_vlm.eval.metrics.ptb import (PTB_JAR_ENV, PTB_PUNCTUATION, find_ptb_jar,
                                java_ptb_unavailable_reason, ptb_tokenize_approx,
                                ptb_tokenize_java)
from tl_vlm.eval.metrics.vqa import NORMALISE_MODES, normalise_vqa_answer, vqa_accuracy

__all__ = [
    "CiderResult", "NORMALISE_MODES", "PTB_JAR_ENV", "PTB_PUNCTUATION", "TOKENIZE_MODES",
    "cider_d", "find_ptb_jar", "java_ptb_unavailable_reason", "normalise_vqa_answer",
    "ptb_tokenize_approx", "ptb_tokenize_java", "vqa_accuracy",
]
