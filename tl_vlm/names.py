"""Names the command line checks before it imports torch (so a typo fails in a moment).

Example:
    >>> STEPS[0], TASK_NAMES[1], DEFAULT_STEPS["imagenet"], RANDOM_DRAWS["coco"]
    ('accuracy', 'vqav2', ('accuracy', 'overlap'), 3)
"""

STEPS = ("accuracy", "progressive", "contribution", "separation", "overlap", "patching")
CONDITIONS = ("none", "gate", "img_to_text", "random")
TASK_NAMES = ("toy", "vqav2", "flickr30k", "coco", "imagenet", "steering", "imagenet_open")
# The shipped toy models and their folders under tl_vlm/toy/models (tl_vlm.toy.TOY_MODELS).
TOY_MODELS = {"toy-gated": "gated", "toy-distributed": "distributed",
              "toy-last-image": "last_image"}

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
