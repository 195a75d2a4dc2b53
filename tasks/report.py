"""Pictures and a static HTML report for a label set (opens offline: every image is embedded, no CDN)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})  # no version stamp: same inputs, same bytes
    _plt().close(fig)


def embedding_map(vectors: np.ndarray, max_points: int, method: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates for a seeded sample of at most ``max_points`` vectors: ``(indices, xy)``."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(vectors), size=min(max_points, len(vectors)), replace=False))
    x = np.asarray(vectors[idx], dtype=np.float64)
    x = PCA(n_components=min(50, x.shape[1], len(x)), random_state=seed).fit_transform(x)
    if method == "tsne" and len(x) > 10:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        # one OpenMP thread: Barnes-Hut t-SNE meets a barrier every iteration, and when the other core is busy
        # (a shared server, another flow) its threads spin-wait: 2,000 points took 44.6 s on 2 threads at load 4
        # against 6.4 s on one
        with threadpool_limits(limits=1, user_api="openmp"):
            tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(x) // 4))
            xy = tsne.fit_transform(x)
    else:
        xy = x[:, :2] if x.shape[1] >= 2 else np.column_stack([x[:, 0], np.zeros(len(x))])
    return idx, xy


def plot_map(xy: np.ndarray, groups: list[str], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    names = sorted(set(groups))
    cmap = plt.get_cmap("tab20", max(len(names), 1))
    g = np.array(groups)
    for i, name in enumerate(names):
        m = g == name
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i), label=f"{name} ({m.sum()})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(names) <= 24:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    _save(fig, path)


def plot_sizes(clusters: np.ndarray, labels: list[str], path: Path) -> None:
    plt = _plt()
    sizes = pd.Series(clusters).value_counts().sort_index()
    names = pd.Series(labels).groupby(pd.Series(clusters)).agg(lambda s: s.mode().iat[0])
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(sizes)), 4))
    ax.bar([f"{c}\n{names[c]}" for c in sizes.index], sizes.values, color="#4878a8")
    ax.set_ylabel("images")
    ax.set_title("cluster sizes (log scale)")
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=7)
    _save(fig, path)


def plot_confusion(y_true: list[str], y_pred: list[str], path: Path) -> None:
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    true_names = sorted(set(y_true))
    pred_names = sorted(set(y_pred))
    names = true_names + [p for p in pred_names if p not in true_names]
    cm = confusion_matrix(y_true, y_pred, labels=names)[: len(true_names)]
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(names), 1 + 0.5 * len(true_names)))
    ax.imshow(np.log1p(cm), cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(true_names)), true_names, fontsize=7)
    ax.set_xlabel("label in this set")
    ax.set_ylabel("ground truth")
    _save(fig, path)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(
    folder: Path, title: str, facts: dict[str, object], metrics: dict[str, object], review: pd.DataFrame
) -> Path:
    """``report.html`` from the figures and montages already in ``folder``."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
        f"<h1>{esc(title)}</h1><table>",
    ]
    parts += [f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in facts.items()]
    parts.append("</table><h2>Metrics</h2><table>")
    for k, v in metrics.items():
        if not isinstance(v, dict | list):
            parts.append(f"<tr><th>{esc(k)}</th><td>{esc(f'{v:.4f}' if isinstance(v, float) else str(v))}</td></tr>")
    parts.append("</table>")
    for name, caption in (
        ("cluster_sizes.png", "Cluster sizes"),
        ("map_by_cluster.png", "Embedding map by cluster"),
        ("map_by_label.png", "Embedding map by label"),
        ("confusion.png", "Ground truth vs labels"),
    ):
        if (folder / "figures" / name).is_file():
            parts.append(f"<h2>{caption}</h2>{_img(folder / 'figures' / name, caption)}")
    parts.append(f"<h2>Review queue ({len(review)} images, most informative first)</h2><table>")
    parts.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in review.columns) + "</tr>")
    for row in review.head(100).itertuples(index=False):
        parts.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>")
    parts.append("</table><h2>Clusters</h2>")
    for path in sorted((folder / "montages").glob("*.png"), key=lambda p: int(p.stem.split("-")[-1])):
        parts.append(f"<h3>{esc(path.stem)}</h3>{_img(path, path.stem)}")
    parts.append("</body></html>")
    out = folder / "report.html"
    out.write_text("\n".join(parts))
    return out
