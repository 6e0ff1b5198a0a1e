"""Matplotlib figures used by the experiments and notebooks."""

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter


def _finish(fig, path, title, set_title):
  """Titles and lays out `fig`; writes it to `path` (PNG) and closes it when a path is given."""
  if title:
    set_title(title)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return fig


def certified_accuracy_curve(
  radius: np.ndarray, correct: np.ndarray, eps_grid: np.ndarray
) -> np.ndarray:
  """Fraction of points correctly classified with certified radius > eps, per eps."""
  radius = np.asarray(radius)[:, None]
  return np.mean(np.asarray(correct)[:, None] & (radius > np.asarray(eps_grid)[None, :]), 0)


def plot_certified_accuracy(
  curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
  path: str | None = None,
  *,
  title: str = '',
  marks: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
):
  """Certified accuracy against the L2 radius eps (pixel units), one line per model.

  Args:
    curves: label -> (eps grid, certified accuracy on it).
    path: PNG path to write (None: only return the figure).
    title: figure title.
    marks: label -> (eps, accuracy) points drawn as markers (e.g. PGD robust accuracy).

  Returns:
    The matplotlib Figure.
  """
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, (eps, acc) in curves.items():
    ax.plot(eps, 100 * np.asarray(acc), label=label)
  for label, (eps, acc) in (marks or {}).items():
    ax.plot(eps, 100 * np.asarray(acc), 'o--', ms=4, label=label)
  ax.set_xlabel('L2 radius eps (pixels in [0, 1])')
  ax.set_ylabel('accuracy (%)')
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _finish(fig, path, title, ax.set_title)


def plot_accuracy_vs_compression(
  curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  points: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
  path: str | None = None,
  *,
  title: str = '',
):
  """Test accuracy against the cumulative byte compression ratio (log x), one line per method.

  Args:
    curves: label -> (cumulative ratio, test accuracy) over training (one run).
    points: label -> (final ratio, final accuracy) of every seed, drawn as markers.
    path: PNG path to write (None: only return the figure).
    title: figure title.
  """
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, (label, (ratio, acc)) in enumerate(curves.items()):
    color = f'C{i}'
    ax.plot(ratio, 100 * np.asarray(acc), '-', color=color, alpha=0.6, label=label)
    if points and label in points:
      r, a = points[label]
      ax.plot(r, 100 * np.asarray(a), 'o', color=color, ms=5)
  ax.set_xscale('log')
  ax.set_xlabel('cumulative compression ratio (bytes, dense / sent)')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  return _finish(fig, path, title, ax.set_title)


def frequency_ticks(n: int) -> np.ndarray:
  """Tick positions (cycles per image) for an axis of `n` frequencies shown fftshift-ed, which
  runs from -(n // 2) to (n - 1) // 2 (-n/2 to n/2 - 1 for even n): every frequency up to 9,
  else both ends, 0 and the quarter points."""
  lo, hi = -(n // 2), (n - 1) // 2
  if n <= 9:
    return np.arange(lo, hi + 1)
  return np.array(sorted({lo, lo // 2, 0, hi // 2 + (hi % 2), hi}))


def _frequency_panel(fig, ax, a, cbar_label):
  """A 2-D map indexed [u, v] on the unshifted grid, shown with the zero frequency centred."""
  h, w = a.shape
  fu = np.fft.fftshift(np.fft.fftfreq(h, 1.0 / h))  # row u after fftshift: -(h // 2) ...
  fv = np.fft.fftshift(np.fft.fftfreq(w, 1.0 / w))
  extent = (fv[0] - 0.5, fv[-1] + 0.5, fu[-1] + 0.5, fu[0] - 0.5)
  im = ax.imshow(np.fft.fftshift(a), cmap='viridis', extent=extent)
  bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  bar.set_label(cbar_label, fontsize=7)
  bar.ax.tick_params(labelsize=7)
  ax.set_xticks(frequency_ticks(w))
  ax.set_yticks(frequency_ticks(h))
  ax.tick_params(labelsize=7)
  ax.set_xlabel('horizontal frequency v (cycles / image)', fontsize=7)
  ax.set_ylabel('vertical frequency u (cycles / image)', fontsize=7)


def _pixel_panel(fig, ax, a):
  """A perturbation (H, W, C) in pixel space: one channel in grey with a colour bar of the pixel
  change; RGB shown as 0.5 + delta / (2 max |delta|)."""
  span = float(np.max(np.abs(a))) or 1.0
  if a.shape[-1] == 3:
    ax.imshow(0.5 + a / (2 * span))
    ax.set_xlabel('column (pixels); RGB: 0.5 + delta / (2 max |delta|)', fontsize=7)
  else:
    im = ax.imshow(a[..., 0], cmap='gray', vmin=-span, vmax=span)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label('pixel change (image in [0, 1])', fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_xlabel('column (pixels)', fontsize=7)
  ax.set_ylabel('row (pixels)', fontsize=7)
  ax.tick_params(labelsize=7)


def plot_fourier_maps(
  maps: Mapping[str, np.ndarray],
  path: str | None = None,
  *,
  title: str = '',
  colorbar_label: str | Mapping[str, str] = 'error rate (fraction of images misclassified)',
):
  """Images side by side: frequency maps (H, W) shown with the zero frequency centred
  (`np.fft.fftshift`; axes in cycles per image, -N/2 .. N/2 - 1) and perturbations (H, W, C) in
  pixel space, one panel per entry.

  Args:
    maps: label -> array; 2-D arrays are frequency maps indexed [u, v] on the unshifted grid
      (as `fourier.heat_map` returns them), 3-D ones are perturbations.
    path: PNG path to write (None: only return the figure).
    title: figure title.
    colorbar_label: what the colour of the frequency maps is: one label for all, or
      map label -> colour-bar label.

  Returns:
    The matplotlib Figure.
  """
  fig, axes = plt.subplots(
    1, len(maps), figsize=(3.6 * len(maps), 3.5), squeeze=False, layout='constrained'
  )
  for ax, (label, a) in zip(axes[0], maps.items(), strict=True):
    a = np.asarray(a)
    if a.ndim == 2:
      cbar = colorbar_label if isinstance(colorbar_label, str) else colorbar_label.get(label, '')
      _frequency_panel(fig, ax, a, cbar)
    else:
      _pixel_panel(fig, ax, a)
    ax.set_title(label, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  if path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return fig


def plot_measure_scatter(
  panels: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
  path: str | None = None,
  *,
  colors: np.ndarray | None = None,
  color_label: str = '',
  title: str = '',
):
  """One panel per measure: the generalization gap against the measure (log x axis when the
  values are positive), titled with its Kendall tau.

  Args:
    panels: name -> (measure values, gaps, tau).
    colors: optional per-model values for the marker colour (e.g. label noise).
  """
  n = len(panels)
  cols = min(4, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False, layout='constrained'
  )
  for ax, (name, (x, gap, tau)) in zip(axes.flat, panels.items(), strict=False):
    x = np.asarray(x)
    sc = ax.scatter(x, gap, c=colors, s=10, cmap='viridis')
    if np.all(x > 0):
      ax.set_xscale('log')
      ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on narrow panels
    ax.set_title(f'{name}\ntau = {tau:.2f}', fontsize=9)
    ax.set_xlabel(name, fontsize=8)
    ax.set_ylabel('generalization gap (train - test acc.)', fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[n:]:
    ax.axis('off')
  if colors is not None:
    fig.colorbar(sc, ax=axes, label=color_label, shrink=0.6)
  fig.suptitle(title)
  if path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
  return fig
