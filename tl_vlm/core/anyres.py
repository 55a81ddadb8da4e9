"""Geometry of LLaVA-style "anyres" tiling, shared by the families whose processor uses it
(LLaVA-NeXT, LLaVA-OneVision).

The processor picks, among the ``image_grid_pinpoints`` resolutions, the one that keeps
the most of the picture's pixels and then wastes the least
(``transformers.image_processing_utils.select_best_resolution``), resizes the picture
into it keeping its aspect ratio, pastes it centred on a black canvas and cuts the
canvas into ``tile_px`` tiles. The model stitches the tiles' ``side x side`` feature maps
into one map and drops the rows (or columns) of letterbox padding ("unpad"), keeping
``rows x cols`` features. These functions work that out from the picture's size alone,
as the model does from ``image_sizes``.
"""

from __future__ import annotations

import math

from tl_vlm.core.layout import Box


def unpadded_tile_map(height: int, width: int, pinpoints: list, tile_px: int, side: int
                      ) -> tuple[tuple[int, int], int, int, int, int]:
    """The tile feature map the model keeps: ``(best resolution, top, left, rows, cols)``,
    ``top``/``left`` being the padding rows/cols it drops (in features) before the map.

    Example (LLaVA-NeXT at 336 px tiles, 24x24 features each):
        >>> pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        >>> unpadded_tile_map(480, 640, pins, 336, 24)   # 2x2 tiles, 48x48, 6 rows cut
        ((672, 672), 6, 0, 36, 48)
    """
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), pinpoints)
    cur_h, cur_w = best_h // tile_px * side, best_w // tile_px * side
    # Undo the letterbox padding: keep the rows/cols the resized image covers.
    top = left = 0
    if width / height > cur_w / cur_h:
        top = (cur_h - int(round(height * (cur_w / width), 7))) // 2
        cur_h -= 2 * top
    else:
        left = (cur_w - int(round(width * (cur_h / height), 7))) // 2
        cur_w -= 2 * left
    return (best_h, best_w), top, left, cur_h, cur_w


def tile_map_box(height: int, width: int, pinpoints: list, tile_px: int, side: int) -> Box:
    """The part of the picture that the (unpadded) tile map covers, in picture pixels.

    The processor resizes the picture into the best resolution keeping its aspect ratio
    and pastes it centred; the model then drops whole feature rows (or cols) of padding,
    so the kept map can overhang the picture by part of a feature.

    Example:
        >>> pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        >>> tile_map_box(480, 640, pins, 336, 24)        # the whole picture, exactly
        (0.0, 0.0, 640.0, 480.0)
    """
    (best_h, best_w), top, left, rows, cols = unpadded_tile_map(height, width, pinpoints,
                                                                tile_px, side)
    if best_w / width < best_h / height:   # as transformers' get_patch_output_size
        new_h, new_w = min(math.ceil(height * best_w / width), best_h), best_w
    else:
        new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    px = tile_px / side                     # canvas pixels per feature
    sy, sx = height / new_h, width / new_w  # picture pixels per canvas pixel
    return ((left * px - paste_x) * sx, (top * px - paste_y) * sy,
            ((left + cols) * px - paste_x) * sx, ((top + rows) * px - paste_y) * sy)
