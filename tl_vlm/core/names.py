"""Names the command line checks before it imports torch (so a typo fails in a moment).

Example:
    >>> STEPS[0], TASK_NAMES[1], DEFAULT_STEPS["imagenet"], RANDOM_DRAWS["coco"]
    ('accuracy', 'vqav2', ('accuracy', 'overlap'), 3)
"""

from pathlib import Path

STEPS = ("accuracy", "progressive", "contribution", "separation", "overlap", "patching")
CONDITIONS = ("none", "gate", "img_to_text", "random")
TASK_NAMES = ("toy", "vqav2", "flickr30k", "coco", "imagenet", "steering", "imagenet_open")
# The shipped toy models and their folders under tl_vlm/toy/models (tl_vlm.toy.TOY_MODELS).
TOY_MODELS = {"toy-gated": "gated", "toy-distributed": "distributed",
              "toy-last-image": "last_image"}
#: where the toy checkpoints are shipped (package data; nothing of tl_vlm.toy is imported)
TOY_MODELS_DIR = Path(__file__).resolve().parents[1] / "toy" / "models"

# What the main job runs by default on each task: the steps that mean something there
# (overlap needs class labels, patching pairs of classes).
DEFAULT_STEPS = {
    "toy": STEPS,
    "vqav2": ("accuracy", "contribution"),
    "flickr30k": ("accuracy", "contribution", "separation"),
    "coco": ("accuracy", "contribution"),
    "imagenet": ("accuracy", "overlap"),
    "imagenet_open": ("accuracy",),
    "steering": ("accuracy", "patching"),
    "jsonl": STEPS,
}
# The paper's random-knockout draws: 5 for VQA, 3 for captions; the forward-only tasks
# follow VQA, the toy task keeps its 3.
RANDOM_DRAWS = {"vqav2": 5, "flickr30k": 3, "coco": 3, "imagenet": 5, "imagenet_open": 5,
                "steering": 5, "toy": 3, "jsonl": 5}


def toy_model_path(name: str) -> Path:
    """Directory of a shipped toy model: ``"toy-gated"``, ``"toy-distributed"`` or
    ``"toy-last-image"`` (the directory names ``"gated"``, ``"last_image"`` ... work too).

    Example:
        >>> toy_model_path("toy-gated").name, (toy_model_path("gated") / "config.json").is_file()
        ('gated', True)
        >>> toy_model_path("toy-last-image") == toy_model_path("last_image")
        True
    """
    by_dir = {d: n for n, d in TOY_MODELS.items()}
    key = name if name in TOY_MODELS else by_dir.get(name, f"toy-{name}")
    if key not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}; choose from {sorted(TOY_MODELS)}")
    path = TOY_MODELS_DIR / TOY_MODELS[key]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the toy model {key!r} is missing from {path}; regenerate it with "
            f"`python -m tl_vlm.toy.train --out {TOY_MODELS_DIR}`")
    return path


def is_toy_model(name: str) -> bool:
    """Whether ``name`` is a shipped toy model's name.

    Example:
        >>> is_toy_model("toy-gated"), is_toy_model("facebook/chameleon-7b")
        (True, False)
    """
    return name in TOY_MODELS
