"""Rank distribution plot (the EVA paper's Figure 2 view): modules x layers heat map."""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

_LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


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


def plot_ranks(ranks: Dict[str, int], path: str, title: str = "EVA rank distribution") -> str:
    """Write a PNG heat map of ranks (rows: module kind, columns: layer index); returns path."""
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
