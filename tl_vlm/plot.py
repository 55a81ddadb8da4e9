"""Figures: per-token scores over the picture, curves over layers, the study's figures.

Every function returns a plotly ``Figure`` (show it in a notebook, or ``fig.write_html``).

* :func:`image_scores` draws one score per image token (an attention row, a
  contribution, a knockout effect...) over the picture the model saw: each family's
  token grid is placed where its processor put it (a centre crop for Chameleon and
  LLaVA-1.5, a padded square for Janus, the whole picture for Qwen2-VL's merged patches,
  Pixtral's rows and Emu3's VQ grid, and LLaVA-OneVision's base grid *and* its anyres
  tile map side by side, each over the whole picture). :func:`token_boxes` and
  :func:`place_tokens` give the same placement as numbers; :func:`grid_scores` draws a
  ``[rows, cols]`` map on the token grid alone.
* :func:`layer_curves` and :func:`layer_heatmap`: values per layer.
* :func:`notebook_figures`: figures that draw in Jupyter, in exported HTML and on the
  docs site, offline; importing ``tl_vlm.plot`` in a notebook turns it on (unless
  ``PLOTLY_RENDERER`` names a renderer), so no setup call is needed.
* :func:`knockout_accuracy`, :func:`progressive_knockout`, :func:`contribution`,
  :func:`contribution_map`, :func:`modality_separation`, :func:`neighbourhood_overlap`
  and :func:`patching` draw the Narrow Gate study's results (the entries of
  ``results.json``, see :mod:`tl_vlm.study.runner`); :mod:`tl_vlm.study.report` puts them on its page.

Example:
    >>> from tl_vlm import HookedVLM, plot
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batch = model.prepare(make_examples(2).prompts)
    >>> logits, cache = model.run_with_cache(batch)
    >>> pattern = cache["blocks.3.attn.hook_pattern"][0].mean(0)     # [query, key], mean over heads
    >>> last = batch.positions.last[0].item()
    >>> fig = plot.image_scores(model, batch, pattern[last], score_name="attention")
    >>> fig.layout.title.text
    'attention of each image token'
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.core.layout import ImageView

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from tl_vlm.core.batch import VLMBatch

Picture = Any  # a PIL image or an ``[height, width, 3]`` uint8 array
Values = Union[Tensor, Sequence[float], Any]

_PICTURE_PX = 360  # longest side of the picture embedded in a figure


# -- notebooks ---------------------------------------------------------------------------------
NOTEBOOK_RENDERER = "tl_vlm_notebook"


def notebook_figures() -> None:
    """Show plotly figures in notebooks so that they draw everywhere, offline.

    Sets plotly's default renderer to ``"plotly_mimetype+tl_vlm_notebook"``: every figure
    output carries plotly's JSON (interactive in JupyterLab and VS Code) *and* an HTML
    drawing, with plotly.js embedded once, in the first figure's output, so that the
    figure also draws in exported HTML (nbconvert), on the docs site and in the classic
    notebook. Unlike plotly's own ``"notebook"`` renderer it loads no MathJax from a CDN.

    Example:
        >>> import plotly.io as pio
        >>> before = pio.renderers.default
        >>> notebook_figures()
        >>> pio.renderers.default
        'plotly_mimetype+tl_vlm_notebook'
        >>> pio.renderers.default = before
    """
    import plotly.io as pio

    if NOTEBOOK_RENDERER not in pio.renderers:
        pio.renderers[NOTEBOOK_RENDERER] = _offline_notebook_renderer()
    pio.renderers.default = f"plotly_mimetype+{NOTEBOOK_RENDERER}"


def _offline_notebook_renderer():
    from plotly.io import to_html

    from tl_vlm.core.compat import plotly_notebook_renderer_base

    NotebookRenderer = plotly_notebook_renderer_base()

    class OfflineNotebookRenderer(NotebookRenderer):
        """plotly's notebook renderer (plotly.js embedded once), without MathJax's CDN."""

        def to_mimebundle(self, fig_dict):
            return {"text/html": to_html(fig_dict, config=self.config, include_plotlyjs=False,
                                         include_mathjax=False, full_html=False,
                                         default_width="100%", default_height=525,
                                         validate=False)}

    return OfflineNotebookRenderer()


# -- placing tokens on the picture ----------------------------------------------------------
@dataclass(frozen=True)
class PlacedView:
    """One block of an image's tokens, placed on its picture.

    Attributes:
        image: the image's number in its example (prompt order).
        view: the block and the part of the picture it covers.
        tokens: ``[rows, cols]`` index into ``positions.image[example]`` of the token at
            each cell, -1 where the block has no token (e.g. OneVision's last base row).
        picture: the picture (None: drawn in token units).

    Example:
        >>> import torch
        >>> from tl_vlm.core.layout import ImageView
        >>> view = ImageView("image", 0, rows=1, cols=2, box=(0, 0, 20, 10))
        >>> PlacedView(0, view, torch.tensor([[0, 1]]), picture=None).title
        'image 0 (1x2 tokens)'
    """

    image: int
    view: ImageView
    tokens: Int[Tensor, "rows cols"]
    picture: Optional[Picture]

    @property
    def title(self) -> str:
        what = "" if self.view.name == "image" else f" · {self.view.name}"
        return f"image {self.image}{what} ({self.view.rows}x{self.view.cols} tokens)"


def _as_pictures(images: Any, n_images: int) -> list[Optional[Picture]]:
    if images is None:
        return [None] * n_images
    pictures = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(pictures) != n_images:
        raise ValueError(f"the example has {n_images} image(s) but {len(pictures)} picture(s) "
                         f"were given; pass the example's own pictures, in prompt order")
    return pictures


def _picture_size(picture: Picture) -> tuple[int, int]:
    """(height, width) of a PIL image or an ``[height, width, channels]`` array."""
    if hasattr(picture, "size") and not hasattr(picture, "shape"):
        width, height = picture.size
        return int(height), int(width)
    shape = tuple(picture.shape)
    if len(shape) != 3:
        raise ValueError(f"a picture must be a PIL image or a [height, width, 3] array, got "
                         f"shape {shape}")
    return int(shape[0]), int(shape[1])


def place_tokens(model: Any, batch: "VLMBatch", example: int = 0,
                 images: Any = None) -> list[PlacedView]:
    """Each image of one example, cut into the blocks its family's layout places.

    Args:
        model: the :class:`~tl_vlm.HookedVLM` (its layout knows the processor).
        batch: the batch ``model.prepare`` made.
        example: which example of the batch.
        images: the example's pictures (one, or a list in prompt order), as given to
            ``prepare``; None places the tokens in token units.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> [placed] = place_tokens(model, batch)
        >>> placed.title, placed.tokens[1].tolist()          # row 1 holds tokens 6..11
        ('image 0 (6x6 tokens)', [6, 7, 8, 9, 10, 11])
    """
    pos = batch.positions
    if not 0 <= example < pos.batch_size:
        raise IndexError(f"example {example} is outside the batch of {pos.batch_size}")
    grid = pos.grid[example].cpu()
    n_images = pos.n_images(example)
    if n_images == 0:
        raise ValueError(f"example {example} has no image tokens to place")
    pictures = _as_pictures(images, n_images)
    metas = model.layout.image_grids(batch.inputs) or []
    first = sum(pos.n_images(b) for b in range(example))   # this example's first image
    placed = []
    for i, picture in enumerate(pictures):
        mine = (grid[:, 0] == i).nonzero().flatten()
        rows, cols = int(grid[mine, 1].max()) + 1, int(grid[mine, 2].max()) + 1
        meta = metas[first + i] if first + i < len(metas) else None
        size = None if picture is None else _picture_size(picture)
        for view in model.layout.image_views(rows, cols, size, meta):
            tokens = torch.full((view.rows, view.cols), -1, dtype=torch.long)
            r = grid[mine, 1] - view.first_row
            inside = (r >= 0) & (r < view.rows)
            tokens[r[inside], grid[mine[inside], 2]] = mine[inside]
            placed.append(PlacedView(i, view, tokens, picture))
    return placed


def token_boxes(model: Any, batch: "VLMBatch", example: int = 0,
                images: Any = None) -> Float[Tensor, "n_image_tokens 4"]:
    """Where each image token of one example lies on its picture.

    Row ``k`` is ``(left, top, right, bottom)``, in the picture's pixels, of the token
    at ``positions.image[example][k]``; in token units when ``images`` is None.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> token_boxes(model, batch)[7].tolist()       # token 7: row 1, col 1
        [1.0, 1.0, 2.0, 2.0]
    """
    n = len(batch.positions.image[example])
    boxes = torch.full((n, 4), float("nan"), dtype=torch.float64)
    for placed in place_tokens(model, batch, example, images):
        for (r, c), k in _cells(placed.tokens):
            boxes[k] = torch.tensor(placed.view.cell(r, c), dtype=torch.float64)
    return boxes


def _cells(tokens: Tensor):
    for r, c in (tokens >= 0).nonzero().tolist():
        yield (r, c), int(tokens[r, c])


# -- drawing --------------------------------------------------------------------------------
def _numpy(values: Values):
    import numpy as np

    if isinstance(values, Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def _image_token_scores(batch: "VLMBatch", scores: Values, example: int):
    """Scores of the example's image tokens, from a per-position or per-image-token vector."""
    values = _numpy(scores)
    while values.ndim > 1 and values.shape[0] == 1:   # pattern[pos.last[0]]: a [1, n] row
        values = values[0]
    image = batch.positions.image[example].cpu().numpy()
    if values.ndim == 1 and len(values) == batch.positions.seq_len:
        return values[image]
    if values.ndim == 1 and len(values) == len(image):
        return values
    raise ValueError(
        f"scores must be one value per position ({batch.positions.seq_len}, e.g. a row of an "
        f"attention pattern) or per image token of example {example} ({len(image)}, aligned "
        f"with positions.image[{example}]); got shape {tuple(values.shape)}")


def _thumbnail(picture: Picture):
    """The picture as a JPEG data URI at most ``_PICTURE_PX`` wide or high, and its scale."""
    from PIL import Image

    img = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    img = img.convert("RGB")
    width, height = img.size
    shrink = max(1.0, max(width, height) / _PICTURE_PX)
    small = img.resize((max(1, round(width / shrink)), max(1, round(height / shrink))))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return uri, width / small.size[0], height / small.size[1]


def _colorbar(title: str) -> dict:
    """A titled colour bar whose ticks never use SI suffixes ("160n"): 1.6e-7 instead."""
    return dict(title=dict(text=title), exponentformat="e", showexponent="all")


def _token_ticks(n: int) -> dict:
    """Whole-number ticks at the cell centres of ``n`` token rows or columns."""
    step = max(1, -(-n // 12))
    vals = list(range(0, n, step))
    return dict(tickmode="array", tickvals=[v + 0.5 for v in vals], ticktext=[str(v) for v in vals])


def _draw_view(fig: "go.Figure", row: int, col: int, placed: PlacedView, values,
               positions, opacity: float) -> None:
    import numpy as np
    import plotly.graph_objects as go

    view, picture = placed.view, placed.picture
    z = np.full((view.rows, view.cols), np.nan)
    where = np.full((view.rows, view.cols), -1)
    for (r, c), k in _cells(placed.tokens):
        z[r, c], where[r, c] = values[k], positions[k]
    h, w = view.cell_size
    left, top, right, bottom = view.box
    if picture is not None:
        uri, sx, sy = _thumbnail(picture)
        height, width = _picture_size(picture)
        fig.add_trace(go.Image(source=uri, x0=sx / 2, y0=sy / 2, dx=sx, dy=sy,
                               hoverinfo="skip"), row, col)
        left, top = min(left, 0.0), min(top, 0.0)
        right, bottom = max(right, float(width)), max(bottom, float(height))
    fig.add_trace(go.Heatmap(
        z=z, x0=view.box[0] + w / 2, dx=w, y0=view.box[1] + h / 2, dy=h,
        coloraxis="coloraxis", opacity=opacity if picture is not None else 1.0,
        customdata=where, hoverongaps=False,
        hovertemplate="position %{customdata}<br>score %{z:.4g}<extra></extra>"), row, col)
    axis = dict(showgrid=False, zeroline=False, constrain="domain")
    if picture is not None:  # outline what the tokens cover (crops, padded squares)
        fig.add_shape(type="rect", x0=view.box[0], y0=view.box[1], x1=view.box[2],
                      y1=view.box[3], line=dict(color="white", width=1, dash="dot"),
                      row=row, col=col)
        xticks = yticks = dict(showticklabels=False, ticks="")
    else:
        xticks, yticks = _token_ticks(view.cols), _token_ticks(view.rows)
    fig.update_xaxes(range=[left, right], **axis, **xticks, row=row, col=col)
    fig.update_yaxes(range=[bottom, top], **axis, **yticks, row=row, col=col)


def image_scores(model: Any, batch: "VLMBatch", scores: Values, example: int = 0,
                 images: Any = None, *, score_name: str = "score", title: Optional[str] = None,
                 colorscale: str = "Viridis", zmin: Optional[float] = None,
                 zmax: Optional[float] = None, opacity: float = 0.6) -> "go.Figure":
    """Per-token scores of one example drawn over its pictures (or its token grid).

    Args:
        model: the :class:`~tl_vlm.HookedVLM`.
        batch: the batch ``model.prepare`` made.
        scores: one value per position of the batch's sequences (e.g. a query's row of
            an attention pattern: only the image tokens are drawn) or one per image
            token of the example, aligned with ``positions.image[example]``.
        example: which example.
        images: the example's pictures, as given to ``prepare`` (one, or a list in prompt
            order); None draws the token grid alone.
        score_name: the colour bar's title.
        title, colorscale, zmin, zmax, opacity: figure title (default: ``score_name``
            of each image token), plotly colour scale, colour range, and the heat map's
            opacity over a picture.

    One panel per block of tokens: one per image for most families; LLaVA-OneVision
    draws its base grid and its anyres tile map as two panels, each over the whole
    picture. A dotted outline marks what the tokens cover (a centre crop, a padded
    square). All panels share the colour scale.

    Example:
        >>> import numpy as np
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> fig = image_scores(model, batch, np.arange(36.0), score_name="token number")
        >>> heat = fig.data[0]
        >>> heat.z.shape, heat.z[1, 0], fig.layout.coloraxis.colorbar.title.text
        ((6, 6), 6.0, 'token number')
        >>> image_scores(model, batch, np.arange(5.0))
        Traceback (most recent call last):
        ...
        ValueError: scores must be one value per position (46, e.g. a row of an attention ...
    """
    from plotly.subplots import make_subplots

    values = _image_token_scores(batch, scores, example)
    positions = batch.positions.image[example].cpu().numpy()
    panels = place_tokens(model, batch, example, images)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[p.title for p in panels],
                        horizontal_spacing=0.04, vertical_spacing=0.08)
    for i, placed in enumerate(panels):
        _draw_view(fig, i // ncols + 1, i % ncols + 1, placed, values, positions, opacity)
    fig.update_layout(
        title=title or f"{score_name} of each image token",
        coloraxis=dict(colorscale=colorscale, cmin=zmin, cmax=zmax,
                       colorbar=_colorbar(score_name)),
        template="plotly_white", height=90 + 330 * nrows, margin=dict(l=20, r=20, t=70, b=20))
    for i, placed in enumerate(panels):  # equal x and y scales, per panel
        n = "" if i == 0 else str(i + 1)
        fig.layout[f"yaxis{n}"].scaleanchor = f"x{n}"
    return fig


def grid_scores(z: Values, *, score_name: str = "score", title: Optional[str] = None,
                colorscale: str = "Viridis", zmin: Optional[float] = None,
                zmax: Optional[float] = None) -> "go.Figure":
    """A ``[rows, cols]`` map of token scores, drawn on the token grid (row 0 on top).

    Example:
        >>> fig = grid_scores([[0.1, 0.2], [0.3, 0.4]], score_name="share")
        >>> list(fig.layout.xaxis.range), list(fig.layout.yaxis.range)    # tight: no margin
        ([0.0, 2.0], [2.0, 0.0])
    """
    import numpy as np

    z = np.asarray(_numpy(z), dtype=float)
    if z.ndim != 2:
        raise ValueError(f"grid_scores needs a [rows, cols] map, got shape {z.shape}")
    rows, cols = z.shape
    view = ImageView("image", 0, rows, cols, (0.0, 0.0, float(cols), float(rows)))
    tokens = torch.arange(rows * cols).reshape(rows, cols)
    placed = PlacedView(0, view, tokens, None)
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=1)
    _draw_view(fig, 1, 1, placed, z.reshape(-1), np.arange(rows * cols), 1.0)
    fig.update_traces(customdata=np.stack(np.indices((rows, cols)), axis=-1),
                      hovertemplate="row %{customdata[0]}, col %{customdata[1]}: %{z:.4g}"
                                    "<extra></extra>", selector=dict(type="heatmap"))
    fig.update_layout(title=title or score_name, template="plotly_white",
                      height=min(520, 140 + 22 * rows), margin=dict(l=60, r=20, t=60, b=50),
                      coloraxis=dict(colorscale=colorscale, cmin=zmin, cmax=zmax,
                                     colorbar=_colorbar(score_name)))
    fig.update_xaxes(title_text="column")
    fig.update_yaxes(title_text="row", scaleanchor="x")
    return fig


# -- values per layer ------------------------------------------------------------------------
def _layer_ticks(values: Sequence[Any]) -> dict:
    """Whole-number ticks for a layer axis (at most ~16 labels)."""
    return dict(tickmode="linear", tick0=0, dtick=max(1, -(-len(values) // 16)))


def _add_curves(fig: "go.Figure", curves: Mapping[str, Values], x: Sequence[Any],
                bands: Optional[Mapping[str, tuple[Values, Values]]] = None,
                row: Optional[int] = None, col: Optional[int] = None,
                legend_suffix: str = "") -> None:
    import plotly.graph_objects as go

    at = {} if row is None else dict(row=row, col=col)
    x = list(x)
    for name, (lo, hi) in (bands or {}).items():
        lo, hi = list(_numpy(lo)), list(_numpy(hi))
        fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", opacity=0.25,
                                 line=dict(width=0), name=name + legend_suffix,
                                 hoverinfo="skip"), **at)
    for name, y in curves.items():
        fig.add_trace(go.Scatter(x=x, y=list(_numpy(y)), mode="lines+markers",
                                 name=name + legend_suffix), **at)


def layer_curves(curves: Mapping[str, Values], layers: Optional[Sequence[Any]] = None, *,
                 title: Optional[str] = None, y_title: Optional[str] = None,
                 x_title: str = "layer", y_range: Optional[tuple[float, float]] = None,
                 bands: Optional[Mapping[str, tuple[Values, Values]]] = None,
                 hlines: Optional[Mapping[str, float]] = None) -> "go.Figure":
    """One line per named curve over layers (flip rate, accuracy, |cos|, a share...).

    Args:
        curves: name -> one value per layer.
        layers: the x values (default ``0..n-1``).
        title, y_title, x_title, y_range: labels and the y range.
        bands: name -> (lower, upper) per layer, drawn as a shaded band (e.g. an IQR).
        hlines: name -> y of a dashed reference line (e.g. ``{"chance": 0.25}``).

    Example:
        >>> fig = layer_curves({"toy-gated": [1.0, 0.9, 0.4, 0.1]}, y_title="flip rate",
        ...                    hlines={"chance": 0.25})
        >>> [trace.name for trace in fig.data], list(fig.data[0].x)
        (['toy-gated'], [0, 1, 2, 3])
    """
    import plotly.graph_objects as go

    if not curves:
        raise ValueError("layer_curves needs at least one curve")
    n = len(next(iter(curves.values())))
    x = list(range(n)) if layers is None else list(layers)
    for name, y in curves.items():
        if len(y) != len(x):
            raise ValueError(f"curve {name!r} has {len(y)} values for {len(x)} layers")
    fig = go.Figure()
    _add_curves(fig, curves, x, bands)
    for name, y in (hlines or {}).items():
        fig.add_hline(y=y, line_dash="dash", annotation_text=name)
    numeric = all(isinstance(v, (int, float)) for v in x)
    fig.update_layout(title=title, template="plotly_white", height=380,
                      margin=dict(l=60, r=20, t=60, b=50),
                      xaxis=dict(title=x_title, **(_layer_ticks(x) if numeric else {})),
                      yaxis=dict(title=y_title, range=list(y_range) if y_range else None))
    return fig


def layer_heatmap(z: Values, columns: Sequence[str], layers: Optional[Sequence[int]] = None, *,
                  score_name: str = "score", title: Optional[str] = None,
                  x_title: Optional[str] = None, zmin: Optional[float] = None,
                  zmax: Optional[float] = None, text: bool = False) -> "go.Figure":
    """A ``[layer, column]`` heat map (layer 0 at the top), e.g. a share per key group.

    Example:
        >>> fig = layer_heatmap([[0.1, 0.9], [0.0, 1.0]], ["image", "eoi"], score_name="share")
        >>> fig.data[0].y, fig.layout.coloraxis.colorbar.title.text
        ((0, 1), 'share')
    """
    import plotly.graph_objects as go

    values = _numpy(z)
    if values.ndim != 2 or values.shape[1] != len(columns):
        raise ValueError(f"layer_heatmap needs [layer, {len(columns)} columns], got shape "
                         f"{values.shape}")
    y = list(range(values.shape[0])) if layers is None else list(layers)
    fig = go.Figure(go.Heatmap(
        z=values, x=list(columns), y=y, coloraxis="coloraxis",
        text=values.round(3) if text else None, texttemplate="%{text}" if text else None,
        hovertemplate="layer %{y}<br>%{x}: %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white",
                      height=min(640, 160 + 24 * len(y)), margin=dict(l=60, r=20, t=60, b=50),
                      coloraxis=dict(colorscale="Viridis", cmin=zmin, cmax=zmax,
                                     colorbar=_colorbar(score_name)),
                      xaxis=dict(title=x_title),
                      yaxis=dict(title="layer", autorange="reversed", **_layer_ticks(y)))
    return fig


# -- the Narrow Gate study's figures -----------------------------------------------------------
#: knockout conditions of the study, as the figures name them
CONDITION_NAMES = {
    "none": "no knockout",
    "gate": "gate (EOI) knocked out",
    "img_to_text": "img→text knocked out",
    "random": "random image tokens knocked out",
}


def knockout_accuracy(res: Mapping[str, Any]) -> "go.Figure":
    """Accuracy per knockout condition (the study's ``accuracy`` step).

    ``res``: ``{"conditions": {name: {"mean": accuracy, "std": over draws, ...}},
    "chance": float | None, "metric": its name}``.

    Example:
        >>> res = {"conditions": {"none": {"mean": 1.0}, "gate": {"mean": 0.25}}, "chance": 0.25}
        >>> list(knockout_accuracy(res).data[0].x)
        ['no knockout', 'gate (EOI) knocked out']
    """
    import plotly.graph_objects as go

    conds = res["conditions"]
    names = list(conds)
    metric = res.get("metric", "accuracy")          # CIDEr is not bounded by 1
    spread = [conds[n].get("std", 0.0) for n in names]   # over the random draws
    top = max([1.0] + [conds[n]["mean"] + d for n, d in zip(names, spread)])
    fig = go.Figure(go.Bar(x=[CONDITION_NAMES.get(n, n) for n in names],
                           y=[conds[n]["mean"] for n in names],
                           error_y=dict(type="data", array=spread, visible=any(spread)),
                           text=[f"{conds[n]['mean']:.2f}" for n in names], textposition="outside"))
    if res.get("chance") is not None:
        fig.add_hline(y=res["chance"], line_dash="dash", annotation_text="chance")
    fig.update_layout(title=f"Task {metric} under attention knockout (all layers)",
                      template="plotly_white", height=380, margin=dict(l=60, r=20, t=60, b=50),
                      yaxis=dict(title=metric, range=[0, 1.1 * top]))
    return fig


def progressive_knockout(res: Mapping[str, Any]) -> "go.Figure":
    """Accuracy with the gate knocked out in the last ``w`` layers only.

    ``res``: ``{"widths": [...], "accuracy": [...], "clean": float, "chance": float}``.

    Example:
        >>> res = {"widths": [1, 2, 4], "accuracy": [0.9, 0.6, 0.25], "clean": 1.0, "chance": 0.25}
        >>> list(progressive_knockout(res).data[0].x)
        [1, 2, 4]
    """
    hlines = {name: res[key] for key, name in (("clean", "no knockout"), ("chance", "chance"))
              if res.get(key) is not None}
    fig = layer_curves({"accuracy": res["accuracy"]}, res["widths"], hlines=hlines,
                       title="Gate knockout in the last w layers only", y_title="accuracy",
                       x_title="w (layers knocked out, counted from the end)", y_range=(0, 1.1))
    fig.update_xaxes(tickmode="array", tickvals=list(res["widths"]))
    fig.update_layout(showlegend=False)
    return fig


def contribution(res: Mapping[str, Any]) -> "go.Figure":
    """Share of the text's attention to each image-side key group, per layer.

    ``res``: ``{"groups": [...], "layers": [...], "weight": [layer][group],
    "value": [layer][group]}`` (the study's ``contribution`` step); attention weight and
    value-weighted side by side, one colour scale (shares, 0 to 1).

    Example:
        >>> res = {"groups": ["image", "eoi"], "layers": [0, 1],
        ...        "weight": [[0.2, 0.8], [0.1, 0.9]], "value": [[0.1, 0.9], [0.0, 1.0]]}
        >>> fig = contribution(res)
        >>> len(fig.data), fig.layout.coloraxis.colorbar.title.text
        (2, 'share')
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups, layers = list(res["groups"]), list(res["layers"])
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("attention weight", "value-weighted ‖A·W_O v‖"))
    for col, key in ((1, "weight"), (2, "value")):
        fig.add_trace(go.Heatmap(z=res[key], x=groups, y=layers, coloraxis="coloraxis",
                                 hovertemplate="layer %{y}<br>%{x}: %{z:.3f}<extra></extra>"),
                      row=1, col=col)
    fig.update_layout(title="Share of text→image attention per image-side key group",
                      template="plotly_white", height=min(640, 180 + 24 * len(layers)),
                      margin=dict(l=60, r=20, t=80, b=50),
                      coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1,
                                     colorbar=_colorbar("share")))
    fig.update_yaxes(autorange="reversed", **_layer_ticks(layers))
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return fig


def contribution_map(res: Mapping[str, Any]) -> Optional["go.Figure"]:
    """Each image token's share of the text's attention, on the image grid; None if the
    study had images of several grids (no single map).

    ``res``: the study's ``contribution`` step (``grid_map`` ``[rows][cols]``, ``map_layers``).

    Example:
        >>> fig = contribution_map({"grid_map": [[0.0, 0.1], [0.2, 0.3]], "map_layers": "2-3"})
        >>> fig.layout.coloraxis.colorbar.title.text
        'share'
    """
    if not res.get("grid_map"):
        return None
    return grid_scores(res["grid_map"], score_name="share",
                       title=f"Text→image-token attention over the image grid "
                             f"(layers {res.get('map_layers')})")


def modality_separation(res: Mapping[str, Any]) -> "go.Figure":
    """Median |cos| between text and image residuals (IQR shaded) and cluster homogeneity.

    ``res``: ``{"layers", "median_abs_cos", "q25", "q75", "homogeneity" (or None)}``.

    Example:
        >>> res = {"layers": [0, 1], "median_abs_cos": [0.5, 0.2], "q25": [0.4, 0.1],
        ...        "q75": [0.6, 0.3], "homogeneity": None}
        >>> [t.name for t in modality_separation(res).data]
        ['interquartile range', 'median |cos|']
    """
    curves = {"median |cos|": res["median_abs_cos"]}
    if res.get("homogeneity") is not None:
        curves["cluster homogeneity (modality)"] = res["homogeneity"]
    return layer_curves(curves, res["layers"], bands={"interquartile range": (res["q25"], res["q75"])},
                        y_range=(0, 1.05), y_title="|cos| / homogeneity",
                        title="Modality separation in the residual stream (layer L: the last "
                              "block's output)")


def neighbourhood_overlap(res: Mapping[str, Any]) -> "go.Figure":
    """Neighbourhood overlap χ with the class label, per layer and representation.

    ``res``: ``{"layers": [...], "representations": {name: [χ per layer]}, "k": int}``.

    Example:
        >>> fig = neighbourhood_overlap({"layers": [0, 1], "representations": {"gate": [0.3, 0.9]},
        ...                              "k": 30})
        >>> fig.layout.title.text
        'Neighbourhood overlap with the class label (k=30)'
    """
    return layer_curves(res["representations"], res["layers"], y_title="χ", y_range=(0, 1.05),
                        title=f"Neighbourhood overlap with the class label (k={res.get('k')})")


def patching(res: Mapping[str, Any]) -> "go.Figure":
    """Flip rate and overlap with the source, per patched layer and stream.

    ``res``: ``{"streams": {stream: {"layers", "flip_rate", "overlap"}}, "n_pairs": int}``.

    Example:
        >>> res = {"streams": {"attn_in": {"layers": [0, 1], "flip_rate": [1.0, 0.2],
        ...                                "overlap": [0.9, 0.1]}}, "n_pairs": 8}
        >>> [t.name for t in patching(res).data]
        ['attn_in: flip rate', 'attn_in: overlap']
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("flip rate", "overlap with the source"))
    n = 1
    for stream, r in res["streams"].items():
        _add_curves(fig, {f"{stream}: flip rate": r["flip_rate"]}, r["layers"], row=1, col=1)
        _add_curves(fig, {f"{stream}: overlap": r["overlap"]}, r["layers"], row=1, col=2)
        n = max(n, len(r["layers"]))
    fig.update_layout(title=f"Steering by patching the gate from another image "
                            f"({res.get('n_pairs')} pairs)", template="plotly_white",
                      height=380, margin=dict(l=60, r=20, t=80, b=50))
    fig.update_xaxes(title_text="layer", tickmode="linear", tick0=0, dtick=max(1, -(-n // 16)))
    fig.update_yaxes(range=[0, 1.05])
    return fig


def flow_map(flow: Any, title: Optional[str] = None) -> "go.Figure":
    """An information-flow map: one line per edge over the windows' first layers, the
    relative change of the correct answer's probability (%), with a band of one standard
    error and a dashed line at no change.

    ``flow``: a :class:`~tl_vlm.analyses.flow.FlowMap` or its ``to_dict()``.

    Example:
        >>> fig = flow_map({"model": "m", "window": 1, "layers": [0, 1],
        ...                 "edges": {"gate->last": [-50.0, 0.0]}, "se": {"gate->last": [5.0, 0.0]}})
        >>> [t.name for t in fig.data if t.mode == "lines+markers"], fig.layout.yaxis.title.text
        (['gate->last'], 'change of p(answer), %')
    """
    data = flow.to_dict() if hasattr(flow, "to_dict") else flow
    edges, se = data["edges"], data.get("se", {})
    bands = {f"{edge} ± SE": ([m - (e or 0) for m, e in zip(vals, se.get(edge, vals))],
                              [m + (e or 0) for m, e in zip(vals, se.get(edge, vals))])
             for edge, vals in edges.items() if edge in se}
    width = data.get("window", 1)
    x_title = "layer" if width == 1 else f"first layer of the window ({width} layers)"
    return layer_curves(edges, data["layers"], bands=bands, hlines={"no change": 0.0},
                        x_title=x_title, y_title="change of p(answer), %",
                        title=title or f"Information flow: {data.get('model', '')}, each edge "
                                       f"cut in one window of {width} layer(s)")


#: the study's steps and the figures of each (a figure function may return None)
STUDY_FIGURES = {
    "accuracy": (knockout_accuracy,),
    "progressive": (progressive_knockout,),
    "contribution": (contribution, contribution_map),
    "separation": (modality_separation,),
    "overlap": (neighbourhood_overlap,),
    "patching": (patching,),
}


def _figures_draw_in_this_notebook() -> None:
    """In a Jupyter kernel, :func:`notebook_figures` on import: a notebook exported with
    nbconvert, or shown on the docs site, draws its figures without a setup call. A
    renderer the user chose (``PLOTLY_RENDERER``) is left alone."""
    import os

    from tl_vlm.core.progress import in_notebook

    if in_notebook() and not os.environ.get("PLOTLY_RENDERER"):
        notebook_figures()


_figures_draw_in_this_notebook()
