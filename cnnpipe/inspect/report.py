"""The `cnnpipe inspect` report: figures, PNG pictures, `summary.json` and one `index.html`.

The plotting helpers return matplotlib `Figure`s built without pyplot (on an Agg
canvas), so they work headless and display in notebooks.

`inspect_run` restores a run (`cnnpipe.runs.load.load_run`), prepares the images like
the training data (`cnnpipe.inspect.featuremaps.prepare_image`) and calls `inspect_images`,
which works on any model (tests and notebooks build their own). Every file is
written to a temporary name and renamed, and `index.html` comes last, so a page
never points at a half-written picture.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.files import atomic_path, write_atomic
from cnnpipe.images.formats import display_path
from cnnpipe.inspect import featuremaps as fm
from cnnpipe.training.plots import display_range, display_rgb, feature_grid

__all__ = ["inspect_images", "inspect_run", "write_report", "plot_planes", "plot_feature_maps", "plot_kernels",
           "plot_grad_cam", "plot_attribution", "save_figure", "DPI"]

DPI = 100  # every figure is saved at its figsize * DPI, no tight bbox: the PNG size is known in advance

NEVER_ACTIVE = "a channel whose value is <= 0 at every position of the image (a relu after it outputs only zeros)"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "image"


class _Pictures:
    """Saves figures into the output folder and remembers each file's pixel size."""

    def __init__(self, out: Path) -> None:
        self.out, self.files = out, {}

    def save(self, fig: Any, name: str) -> dict[str, Any]:
        w, h = save_figure(fig, self.out / name)
        self.files[name] = {"width": w, "height": h}
        return {"file": name, "width": w, "height": h}


# ---------------------------------------------------------------- figures
# Axes are placed by hand (in inches): a layout engine would double the drawing time,
# and a page holds dozens of these pictures.

def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # whole pixels, so the PNG is exactly figsize * DPI (matplotlib truncates fractions)
    fig = Figure(figsize=(round(w * DPI) / DPI, round(h * DPI) / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _axes(fig: Any, left: float, bottom: float, width: float, height: float) -> Any:
    """Axes at a position given in inches from the lower left corner."""
    fw, fh = fig.get_size_inches()
    return fig.add_axes((left / fw, bottom / fh, width / fw, height / fh))


def save_figure(fig: Any, path: str | os.PathLike) -> tuple[int, int]:
    """Write `fig` as PNG at its own size (temp file + rename); returns (width, height) in pixels."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    w, h = fig.get_size_inches() * DPI
    return int(round(w)), int(round(h))


def _image_with_bar(pixels: np.ndarray, title: str, **imshow: Any) -> tuple[Any, Any, Any]:
    h, w = pixels.shape[:2]
    side = 1.9
    iw, ih = (side, side * h / w) if w >= h else (side * w / h, side)
    fig = _figure(2.9, ih + 0.45)
    ax = _axes(fig, 0.08, 0.1, iw, ih)
    im = ax.imshow(pixels, interpolation="nearest", **imshow)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8, loc="left")
    cax = _axes(fig, 0.08 + iw + 0.1, 0.1, 0.12, ih)
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
    return fig, ax, im


def plot_planes(pixels: np.ndarray, planes: Sequence[str], bit_depth: int) -> list[Any]:
    """One figure per channel plane of (H, W, C) raw pixels, colour bar in the plane's own units: 0 to full
    scale for unsigned pixels; signed and float ones (HU, dB) from minimum to maximum, no data in magenta."""
    pixels = np.asarray(pixels)
    if pixels.dtype.kind == "u":
        top = (1 << bit_depth) - 1
        return [_image_with_bar(pixels[..., k], f"plane {name}: {bit_depth}-bit values 0..{top}",
                                cmap="gray", vmin=0, vmax=top)[0] for k, name in enumerate(planes)]
    low, high = display_range(pixels)
    missing = np.isnan(pixels).sum(axis=(0, 1)) if pixels.dtype.kind == "f" else np.zeros(len(planes), int)
    span = [f"values {lo:.4g}..{hi:.4g}" if m < pixels[..., 0].size else "no data at all" for lo, hi, m in
            zip(low, high, missing)]
    return [_image_with_bar(pixels[..., k], f"plane {name}: {pixels.dtype} {span[k]}"
                            + (f", {missing[k]} no data" if missing[k] else ""), cmap=_cmap("gray", bad="magenta"),
                            vmin=float(low[k]), vmax=float(max(high[k], low[k] + 1e-6)))[0]
            for k, name in enumerate(planes)]


def plot_feature_maps(fmap: np.ndarray, layer: str) -> Any:
    """All channels of one image's (H, W, C) feature map as a tile grid (per-tile min-max)."""
    fmap = np.asarray(fmap)
    if fmap.ndim == 1:  # a dense layer: one bar per unit
        fig = _figure(4.0, 1.6)
        ax = _axes(fig, 0.4, 0.3, 3.5, 1.0)
        ax.bar(np.arange(fmap.size), fmap, color="0.3")
        ax.set_title(f"{layer}: {fmap.size} units (raw values)", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        return fig
    grid, rows, cols = feature_grid(fmap)
    gw = min(5.0, max(1.6, 0.32 * cols * max(fmap.shape[1], 4) / 8))
    gh = gw * grid.shape[0] / grid.shape[1]
    fig = _figure(max(gw, 2.4) + 0.1, gh + 0.32)
    ax = _axes(fig, 0.05, 0.05, gw, gh)
    ax.imshow(grid, cmap=_cmap("viridis", bad="white"), vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{layer}: {fmap.shape[2]} ch, {fmap.shape[0]}x{fmap.shape[1]}", fontsize=8, loc="left")
    return fig


def _cmap(name: str, bad: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def plot_kernels(kernels: np.ndarray, planes: Sequence[str], layer: str) -> Any:
    """First-layer kernels (in_planes, filters, kh, kw): one row per input plane, one tile per filter.

    One symmetric colour scale for every tile, so planes and filters compare directly.
    """
    kernels = np.asarray(kernels, np.float32)
    n_in, n_out, kh, kw = kernels.shape
    bound = float(np.abs(kernels).max()) or 1.0
    cols = min(n_out, 8)
    rows = int(math.ceil(n_out / cols))
    gw_px, gh_px = cols * (kw + 1) - 1, rows * (kh + 1) - 1
    gw = min(5.5, 0.4 * cols * max(kw, 3) / 3)
    gh = gw * gh_px / gw_px
    fig = _figure(gw + 1.3, n_in * (gh + 0.08) + 0.35)
    cmap = _cmap("RdBu_r", bad="0.55")  # grey gaps: white is a zero weight here
    for p in range(n_in):
        ax = _axes(fig, 0.35, 0.05 + (n_in - 1 - p) * (gh + 0.08), gw, gh)
        grid = np.full((gh_px, gw_px), np.nan, np.float32)
        for k in range(n_out):
            r, q = divmod(k, cols)
            grid[r * (kh + 1):r * (kh + 1) + kh, q * (kw + 1):q * (kw + 1) + kw] = kernels[p, k]
        im = ax.imshow(grid, cmap=cmap, vmin=-bound, vmax=bound, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(planes[p] if p < len(planes) else f"in {p}", rotation=0, labelpad=12, fontsize=9,
                      va="center")
        if p == 0:
            ax.set_title(f"{layer}: {n_out} filters of {kh}x{kw}; one block per input plane", fontsize=8, loc="left")
    cax = _axes(fig, 0.35 + gw + 0.12, 0.05, 0.12, n_in * (gh + 0.08) - 0.08)
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
    return fig


def plot_heat(heat: np.ndarray, title: str) -> Any:
    """The Grad-CAM map (0..1) alone, with its colour bar."""
    return _image_with_bar(np.asarray(heat), title, cmap="jet", vmin=0, vmax=1)[0]


def plot_grad_cam(pixels: np.ndarray, heat: np.ndarray, bit_depth: int, title: str) -> Any:
    """The image (full-scale display; signed and float planes from their minimum to maximum) with the
    Grad-CAM map (0..1) over it."""
    fig, ax, _ = _image_with_bar(np.asarray(heat), title, cmap="jet", alpha=0.45, vmin=0, vmax=1, zorder=2)
    pixels = np.asarray(pixels)
    low, peak = (0.0, (1 << bit_depth) - 1) if pixels.dtype.kind == "u" else display_range(pixels)
    ax.imshow(display_rgb(pixels, peak, low), interpolation="nearest", zorder=1)
    return fig


_PLANE_COLOURS = {"R": "tab:red", "G": "tab:green", "B": "tab:blue", "L": "0.4", "A": "0.7"}


def plot_attribution(shares: Sequence[float], planes: Sequence[str], title: str) -> Any:
    """Bar chart of each input plane's share of the decision (shares sum to 1)."""
    shares = np.asarray(shares, np.float64)
    width = max(1.4, 0.45 * len(planes) + 0.5)
    fig = _figure(width + 0.6, 2.35)
    ax = _axes(fig, 0.5, 0.3, width, 1.75)
    bars = ax.bar(list(planes), shares, color=[_PLANE_COLOURS.get(p, "0.5") for p in planes])
    for bar, v in zip(bars, shares):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.02, f"{100 * v:.1f}%", ha="center", fontsize=7)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of |grad x input|", fontsize=7)
    ax.set_title(title, fontsize=8, loc="left")
    ax.tick_params(labelsize=7)
    return fig


# ---------------------------------------------------------------- analysis -> files

def _check_request(model: Any, images: Sequence[fm.InputImage], classes: Sequence[str],
                   layers: Sequence[str] | None, class_name: str | None, top_k: int) -> list[str]:
    """The layers to show; ValueError naming the first bad argument."""
    if top_k < 1:
        raise ValueError(f"--top-k: got {top_k}; expected an integer >= 1")
    if len(classes) != model.num_classes:
        raise ValueError(f"classes: got {len(classes)} names for a model with {model.num_classes} outputs")
    if class_name is not None and class_name not in classes:
        raise ValueError(f"--class: unknown class {class_name!r}; classes: {', '.join(classes)}")
    if not images:
        raise ValueError("no images given")
    names = list(model.feature_layer_names if layers is None else layers)
    for name in names:
        fm._layer_index(model, name)
    return names


def _image_pictures(pics: _Pictures, stem: str, im: fm.InputImage, acts: dict[str, np.ndarray],
                    heat: np.ndarray, shares: np.ndarray, target: str, cam_layer: str) -> dict[str, Any]:
    """One image's pictures (planes, Grad-CAM over it and alone, attribution, feature maps) saved as PNGs."""
    return {
        "planes": [{"plane": p, **pics.save(fig, f"{stem}-plane-{_safe(p)}.png")}
                   for p, fig in zip(im.planes, plot_planes(im.pixels, im.planes, im.bit_depth))],
        "grad_cam": {"layer": cam_layer, **pics.save(
            plot_grad_cam(im.pixels, heat, im.bit_depth, f"Grad-CAM: {target} ({cam_layer})"),
            f"{stem}-gradcam.png")},
        "grad_cam_heat": pics.save(plot_heat(heat, f"Grad-CAM map alone: {target}"), f"{stem}-gradcam-map.png"),
        "attribution": pics.save(plot_attribution(shares, im.planes, f"planes -> {target}"),
                                 f"{stem}-attribution.png"),
        "feature_maps": [{"layer": n, "tiles": int(a.shape[-1]),
                          **pics.save(plot_feature_maps(a, n), f"{stem}-fmap-{_safe(n)}.png")}
                         for n, a in acts.items()],
    }


def inspect_images(model: Any, images: Sequence[fm.InputImage], out_dir: str | os.PathLike, *,
                   classes: Sequence[str], layers: Sequence[str] | None = None,
                   class_name: str | None = None, top_k: int = 5,
                   context: dict[str, Any] | None = None, task: Any = None) -> dict[str, Any]:
    """Analyse `images` with `model`, write pictures, `summary.json` and `index.html` to `out_dir`.

    Args:
      classes: class names, in the model's output order.
      layers: layers to show (default: every conv and pool layer); unknown names are a
        ValueError listing the available ones.
      class_name: explain this class (default: each image's predicted class).
      top_k: how many predictions to list.
      context: extra top-level facts for the summary (run directory, checkpoint step).
      task: a multi-label or regression run's `cnnpipe.tasks.Task`: predictions are its outputs
        (every label's probability, every target's value) and, without `class_name`, the most
        probable label or the first target is explained (Grad-CAM of its logit or value).
    Returns:
      The summary (also `summary.json`).
    """
    names = _check_request(model, images, classes, layers, class_name, top_k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pics = _Pictures(out)

    batch = np.stack([im.pixels for im in images])
    probs, acts = fm.predict_proba(model, batch, names, task)
    regression = task is not None and task.kind == "regression"
    predicted = np.zeros(len(images), int) if regression else probs.argmax(axis=1)
    target = np.full(len(images), classes.index(class_name)) if class_name else predicted
    cam_layer = fm.default_cam_layer(model)
    heat = fm.grad_cam(model, batch, target, cam_layer)
    shares, signed = fm.plane_attribution(model, batch, target)

    kernel_layer, kernels = fm.first_conv_kernels(model)
    kernel_planes = images[0].planes
    kern = pics.save(plot_kernels(kernels, kernel_planes, kernel_layer), f"kernels-{kernel_layer}.png")
    summary: dict[str, Any] = {
        **(context or {}), "classes": list(classes),
        "model": {"in_channels": model.in_channels, "bit_depth": model.bit_depth,
                  "input_size": list(model.input_size), "layers": model.layer_names},
        "definitions": {"feature_maps": fm.TILE_NORMALISATION, "attribution": fm.ATTRIBUTION_METHOD,
                        "never_active": NEVER_ACTIVE,
                        "grad_cam": f"relu(sum_k alpha_k A_k) at layer {cam_layer}, alpha_k = spatial mean of "
                                    "d logit / d A_k, upsampled to the input and scaled to max 1"},
        "kernels": {"layer": kernel_layer, "planes": list(kernel_planes), "shape": list(kernels.shape), **kern},
        "images": [],
    }
    k = min(top_k, len(classes))
    for i, im in enumerate(images):
        tgt = classes[int(target[i])]
        entry: dict[str, Any] = {
            "source": im.source, "notes": list(im.notes), "planes": list(im.planes), "bit_depth": im.bit_depth,
            "dtype": str(im.pixels.dtype),
            "predictions": [{"target": name, "value": float(v)} for name, v in zip(classes, probs[i])] if regression
            else [{"class": classes[j], "probability": float(probs[i, j])}
                  for j in np.argsort(-probs[i], kind="stable")[:k]],
            "explained_class": tgt, "explained_because": "--class" if class_name else
            "first target" if regression else "predicted",
            "attribution": {"shares": dict(zip(im.planes, map(float, shares[i]))),
                            "signed_sums": dict(zip(im.planes, map(float, signed[i])))},
            "layers": fm.activation_stats({n: a[i:i + 1] for n, a in acts.items()}),
            "pictures": _image_pictures(pics, f"{i + 1:02d}-{_safe(Path(im.source).stem)}", im,
                                        {n: a[i] for n, a in acts.items()}, heat[i], shares[i], tgt, cam_layer),
        }
        summary["images"].append(entry)
    summary["files"] = pics.files
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(out, summary)
    return summary


# ---------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:1.2em;max-width:1300px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-top:1px solid #ccc;padding-top:.6em;margin-top:1.4em}
h3{font-size:1em;margin:.8em 0 .3em}figure{display:inline-block;margin:0 .6em .6em 0;vertical-align:top}
figcaption{font-size:.8em;color:#555;max-width:420px}table{border-collapse:collapse;font-size:.85em;margin:.3em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.note{font-size:.85em;color:#555}.row{display:flex;flex-wrap:wrap;align-items:flex-start}"""


def _img(pic: dict[str, Any], caption: str) -> str:
    src = html.escape(pic["file"], quote=True)
    return (f'<figure><img src="{src}" width="{pic["width"]}" height="{pic["height"]}" loading="lazy" '
            f'alt="{html.escape(caption, quote=True)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _image_section(n: int, entry: dict[str, Any], defs: dict[str, str]) -> list[str]:
    pics, tgt = entry["pictures"], entry["explained_class"]
    parts = [f"<h2 id=img-{n}>{n}. {html.escape(entry['source'])}</h2>"]
    if entry["notes"]:
        parts.append('<p class="note">' + "; ".join(html.escape(x) for x in entry["notes"]) + ".</p>")
    preds = entry["predictions"]
    parts.append("<h3>Top predictions</h3>" + (_table(
        ["class", "probability"], [(p["class"], f"{p['probability']:.4f}") for p in preds]) if "class" in preds[0]
        else _table(["target", "predicted value"], [(p["target"], f"{p['value']:.6g}") for p in preds])))
    kind = (f"{entry['bit_depth']}-bit" if entry.get("dtype", "uint8").startswith("uint")
            else entry["dtype"])   # signed and float planes are shown in their own units
    parts.append(f"<h3>Input planes ({kind} values)</h3><div class=row>" + "".join(
        _img(p, f"plane {p['plane']}, raw {kind} values") for p in pics["planes"]) + "</div>")
    shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in entry["attribution"]["shares"].items())
    parts.append(f"<h3>Where and which plane: class {html.escape(tgt)} ({entry['explained_because']})</h3>"
                 "<div class=row>"
                 + _img(pics["grad_cam"], f"Grad-CAM for {tgt} at layer {pics['grad_cam']['layer']}, over the "
                                          "image; 1 = the strongest evidence in this image")
                 + _img(pics["grad_cam_heat"], "the same map alone")
                 + _img(pics["attribution"], f"per-plane attribution: {shares}. {defs['attribution']}")
                 + "</div>")
    parts.append("<h3>Feature maps</h3>"
                 f'<p class="note">One tile per channel, row by row from channel 0; {html.escape(defs["feature_maps"])}.'
                 "</p><div class=row>")
    for f in pics["feature_maps"]:
        st = entry["layers"][f["layer"]]
        parts.append(_img(f, f"{f['layer']}: {f['tiles']} tiles, values {st['min']:.3g}..{st['max']:.3g}, "
                             f"per-tile min-max"))
    parts.append("</div><h3>Activation statistics</h3>" + _table(
        ["layer", "shape", "mean", "max", "never active"],
        [(name, "x".join(map(str, s["shape"])), f"{s['mean']:.4g}", f"{s['max']:.4g}",
          f"{100 * s['never_active_fraction']:.0f}% ({len(s['never_active_channels'])}/{s['channels']})")
         for name, s in entry["layers"].items()]))
    return parts


def _worst_section(worst: dict[str, Any]) -> list[str]:
    """The `--worst` page's head: what is shown, and the most-confused pairs linking to their examples."""
    rows = []
    for pair in worst.get("confused_pairs", []):
        links = " ".join(f'<a href="#img-{k}">#{k}</a>' for k in pair["on_page"])
        others = pair["sources"][:5]
        rest = html.escape(", ".join(others)) + (" ..." if pair["count"] > len(others) else "")
        rows.append(f"<tr><td>{html.escape(pair['true'])}</td><td>{html.escape(pair['predicted'])}</td>"
                    f"<td>{pair['count']}</td><td>{links or '-'}</td><td>{rest}</td></tr>")
    table = ("<table><tr><th>true class</th><th>predicted</th><th>images</th><th>on this page</th>"
             "<th>examples</th></tr>" + "".join(rows) + "</table>") if rows else "<p>No validation image is wrong.</p>"
    head = [f"<h2>The {worst['n']} highest-loss of {worst['validation_images']} validation images</h2>"]
    if "ranked_by" in worst:   # a multi-label or regression run: no class pairs to confuse
        return [*head, f'<p class="note">{html.escape(worst["data"])}; ranked by {html.escape(worst["ranked_by"])}; '
                "each image below shows its true and predicted labels or values, Grad-CAM and per-plane "
                "attribution.</p>"]
    return [*head, f'<p class="note">{html.escape(worst["data"])}; each image below shows its true and predicted '
            "class, the top probabilities, Grad-CAM over the image for the predicted class and per-plane "
            "attribution.</p>", "<h3>Most-confused class pairs</h3>", table]


def write_report(out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write `index.html` for a summary made by `inspect_images`; images are relative paths."""
    out = Path(out_dir)
    defs, kern = summary["definitions"], summary["kernels"]
    title = f"cnnpipe inspect: {summary.get('run_dir', 'model')}"
    model = summary["model"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             '<p class="note">' + html.escape(
                 f"model input: {model['in_channels']} plane(s), {model['bit_depth']}-bit, "
                 f"{model['input_size'][0]}x{model['input_size'][1]}; classes: {', '.join(summary['classes'])}"
                 + (f"; checkpoint step {summary['checkpoint_step']}" if "checkpoint_step" in summary else ""))
             + "</p>",
             "<h2>First-layer kernels</h2>",
             _img(kern, f"{kern['layer']}: one block per input plane ({', '.join(kern['planes'])}), one tile per "
                        "filter (filter k at row k // 8, column k % 8), one shared colour scale (red > 0 > blue)"),
             f'<p class="note">Never active: {html.escape(defs["never_active"])}. '
             f'Grad-CAM: {html.escape(defs["grad_cam"])}. Numbers: <a href="summary.json">summary.json</a>.</p>']
    if "worst" in summary:
        parts.extend(_worst_section(summary["worst"]))
    for n, entry in enumerate(summary["images"], 1):
        parts.extend(_image_section(n, entry, defs))
    parts.append("</body></html>\n")
    path = out / "index.html"
    write_atomic(path, "\n".join(parts))
    return path


# ---------------------------------------------------------------- runs

def inspect_run(run_dir: str | os.PathLike, images: Sequence[str | os.PathLike], *,
                layers: Sequence[str] | None = None, class_name: str | None = None,
                out: str | os.PathLike | None = None, top_k: int = 5, checkpoint: str = "best") -> Path:
    """`cnnpipe inspect`: restore the run, prepare `images` like its training data, write the report.

    Returns the path of `index.html` (in `out`, default RUN_DIR/inspect).
    Raises:
      FileNotFoundError: not a run directory, or no checkpoint in it (the message names it).
      ValueError: an unknown layer or class, or an image the model cannot take.
    """
    from cnnpipe.runs.load import load_run, prepare_for_run

    run = load_run(run_dir, checkpoint)
    model = run.model()
    if layers:
        for name in layers:
            fm._layer_index(model, name)
    # names that are not UTF-8 are shown (page, summary.json) in their escaped display form
    prepared = [dataclasses.replace(im, source=display_path(im.source))
                for im in (prepare_for_run(p, run.info) for p in images)]
    out_dir = Path(out) if out is not None else Path(run_dir) / "inspect"
    inspect_images(model, prepared, out_dir, classes=run.classes, layers=layers, class_name=class_name,
                   top_k=top_k, context={"run_dir": str(run_dir), "checkpoint_step": run.step}, task=run.task)
    return out_dir / "index.html"
