"""Rank distribution plot (the EVA paper's Figure 2 view): modules x layers heat map."""
from __future__ import annotations

import os
import re
import shutil
from typing import Dict, List, Tuple

from ..errors import EvaError
from ..fileio import atomic_write, check_output_path

_LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
_FIRST = {"png": 0, "pdf": 1, "svg": 2}  # listed first in messages


def rank_grid(ranks: Dict[str, int]) -> Tuple[List[str], List[str], List[List[float]]]:
    """(module kinds (rows), layer labels (columns), grid) from ``{module name: rank}``.

    ``encoder.layer.3.attention.self.query`` -> row ``attention.self.query``, column ``3``;
    names without a layer index (``pooler.dense``) get the column ``-``. Missing cells are NaN.
    """
    parsed = []
    for name, rank in ranks.items():
        m = _LAYER_RE.match(name.replace("base_model.model.", ""))
        parsed.append(((m.group(1), m.group(3), m.group(2)) if m else ("", name, "-"), rank))
    prefixes_of = {}
    for (prefix, kind, _), _ in parsed:
        prefixes_of.setdefault(kind, set()).add(prefix)
    cells, kinds, layers = {}, [], []
    for (prefix, kind, layer), rank in parsed:
        if len(prefixes_of[kind]) > 1:  # e.g. model.encoder.layers / model.decoder.layers: keep both rows
            kind = f"{prefix}.{kind}"
        cells[(kind, layer)] = rank
        if kind not in kinds:
            kinds.append(kind)
        if layer not in layers:
            layers.append(layer)
    layers.sort(key=lambda s: (s == "-", int(s) if s.isdigit() else 0))
    grid = [[float(cells.get((k, lay), float("nan"))) for lay in layers] for k in kinds]
    return kinds, layers, grid


def _plot_formats() -> Dict[str, str]:
    """``{extension: description}`` of the formats matplotlib can write here (imported lazily).

    ``pgf`` is left out when its TeX program is missing and ``webp``/``avif`` when Pillow lacks
    them: matplotlib lists them but fails only when saving.
    """
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase
    formats = dict(FigureCanvasBase.get_supported_filetypes())
    if "pgf" in formats and shutil.which(str(matplotlib.rcParams.get("pgf.texsystem", "xelatex"))) is None:
        del formats["pgf"]
    for ext in ("webp", "avif"):
        if ext in formats:
            try:
                from PIL import features
                available = bool(features.check(ext))
            except Exception:  # old Pillow without the feature name: let matplotlib decide
                available = True
            if not available:
                del formats[ext]
    return formats


def _plot_format(path: str) -> str:
    """The format of ``path`` from its extension; :class:`EvaError` when matplotlib cannot write it."""
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    formats = _plot_formats()
    listed = ", ".join("." + e for e in sorted(formats, key=lambda e: (_FIRST.get(e, len(_FIRST)), e)))
    if not ext:
        raise EvaError(f"plot path {path!r}: has no extension, so the image format is unknown; end it with one of "
                       f"{listed}")
    if ext not in formats:
        raise EvaError(f"plot path {path!r}: format '.{ext}' is not supported; use one of {listed}")
    return ext


def check_plot_path(path: str) -> str:
    """Check a plot path before any computation; return it absolute.

    Raises :class:`~eva.errors.EvaError` (one line, ``"plot path {path!r}: ..."``) when the
    extension is missing or names a format matplotlib cannot write, or when the path cannot be
    written (see :func:`eva.fileio.check_output_path`: a directory, a read-only file system, ...).
    """
    if os.path.isdir(os.fspath(path)):  # "is a directory" says more than "no extension"
        check_output_path(path, "plot path")
    _plot_format(path)
    return check_output_path(path, "plot path")


def plot_ranks(ranks: Dict[str, int], path: str, title: str = "EVA rank distribution") -> str:
    """Write a heat map of ranks (rows: module kind, columns: layer index); returns path.

    The image format follows the extension (``.png``, ``.pdf``, ``.svg``, ...; an unsupported
    one raises :class:`~eva.errors.EvaError` before anything is drawn). The file is written
    through :func:`eva.fileio.atomic_write`, so an existing plot survives a failed write.
    """
    fmt = _plot_format(path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds, layers, grid = rank_grid(ranks)
    data = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.65 * len(layers), 1.2 + 0.45 * len(kinds)))
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), labels=layers)
    ax.set_yticks(range(len(kinds)), labels=kinds)
    ax.set_xlabel("layer")
    for i in range(len(kinds)):
        for j in range(len(layers)):
            if not np.isnan(data[i, j]):
                v = data[i, j]
                ax.text(j, i, f"{int(v)}", ha="center", va="center",
                        color="white" if v < np.nanmax(data) * 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_title(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))
    finally:
        plt.close(fig)
    return path
