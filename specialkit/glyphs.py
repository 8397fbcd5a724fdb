"""``glyphs``: the built-in offline dataset — 62 characters (0-9, A-Z, a-z) rendered from fonts.

The fonts are the text faces that ship inside matplotlib (DejaVu, STIX, Computer Modern), never
system fonts, so the data depends only on pinned Python packages. Each image is one character drawn
on its font's baseline (so ``o`` stays smaller than ``O``) with a random font, position, scale,
rotation, shear, stroke width, blur and noise, as a 1 x 32 x 32 ``uint8`` image (white on black).

The alphabet has real look-alike groups — o/O/0, l/I/1/i, s/S/5, z/Z/2, c/C, u/U/v/V, x/X, w/W,
p/P — which is what makes it a good first dataset for specialists.

Generation is deterministic: every (split, class) pair draws from its own random stream seeded by
``(seed, split, class)``. The result is cached as ``.npz`` (no pickle) in ``root`` or in
``$SPECIALKIT_CACHE`` (default ``~/.cache/specialkit``).
"""

from __future__ import annotations

import hashlib
import io
import os
import string
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .dataset import Dataset, DatasetError
from .runs import atomic_write_bytes

__all__ = [
    "GlyphConfig",
    "CLASS_NAMES",
    "FONT_FILES",
    "font_paths",
    "render_split",
    "load_glyphs",
    "load_glyphs_hard",
    "cache_dir",
]

CLASS_NAMES: tuple[str, ...] = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)
COARSE_NAMES: tuple[str, ...] = ("digit", "uppercase", "lowercase")
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)
_SPLITS = {"train": 0, "val": 1, "test": 2}
_CANVAS = 64
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GlyphConfig:
    """How the glyphs are drawn. Ranges are (low, high) of a uniform draw per image.

    Attributes:
        size: output side in pixels.
        font_size: font size on the 64 px drawing canvas.
        scale: relative scale.
        rotation: degrees.
        shear: horizontal shear factor.
        shift: translation in output pixels (each axis).
        stroke: extra stroke width on the canvas, in pixels (integer draw).
        blur: Gaussian blur radius in output pixels.
        noise: standard deviation of additive Gaussian noise, in grey levels.
    """

    size: int = 32
    font_size: int = 40
    scale: tuple[float, float] = (0.85, 1.15)
    rotation: tuple[float, float] = (-12.0, 12.0)
    shear: tuple[float, float] = (-0.2, 0.2)
    shift: tuple[float, float] = (-2.5, 2.5)
    stroke: tuple[int, int] = (0, 1)
    blur: tuple[float, float] = (0.0, 0.8)
    noise: tuple[float, float] = (0.0, 12.0)

    @classmethod
    def hard(cls) -> "GlyphConfig":
        """The ``glyphs_hard`` regime: 16 px, heavy rotation, shear, scale, blur and noise, so a small
        generalist stays far from perfect and specialists have real errors to fix (docs/METHOD.md §8)."""
        return cls(
            size=16,
            scale=(0.75, 1.2),
            rotation=(-20.0, 20.0),
            shear=(-0.3, 0.3),
            shift=(-1.5, 1.5),
            stroke=(0, 1),
            blur=(0.2, 0.9),
            noise=(5.0, 35.0),
        )


def font_paths() -> list[Path]:
    """Paths of the font faces inside matplotlib's ``mpl-data/fonts/ttf``; raises if one is missing."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / name for name in FONT_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"glyphs: font files {missing} not found in {folder}; reinstall matplotlib "
            "(`pip install --force-reinstall matplotlib`), which ships them"
        )
    return paths


@lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size=size)


def _inverse_affine(rng: np.random.Generator, cfg: GlyphConfig) -> tuple[float, ...]:
    """Pillow's AFFINE coefficients (output -> input) of a random scale/shear/rotation/shift."""
    c = _CANVAS / 2.0
    s = rng.uniform(*cfg.scale)
    k = rng.uniform(*cfg.shear)
    th = np.deg2rad(rng.uniform(*cfg.rotation))
    t = rng.uniform(*cfg.shift, size=2) * (_CANVAS / cfg.size)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    fwd = rot @ np.array([[1.0, k], [0.0, 1.0]]) @ np.diag([s, s])
    inv = np.linalg.inv(fwd)
    offset = np.array([c, c]) - inv @ (np.array([c, c]) + t)
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def render_glyph(char: str, font_path: str, rng: np.random.Generator, cfg: GlyphConfig) -> np.ndarray:
    """One augmented glyph as a (size, size) ``uint8`` array."""
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    stroke = int(rng.integers(cfg.stroke[0], cfg.stroke[1] + 1))
    ImageDraw.Draw(canvas).text(
        (_CANVAS / 2, _CANVAS * 0.72),
        char,
        fill=255,
        font=_font(font_path, cfg.font_size),
        anchor="ms",
        stroke_width=stroke,
        stroke_fill=255,
    )
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, _inverse_affine(rng, cfg), Image.Resampling.BILINEAR)
    img = canvas.resize((cfg.size, cfg.size), Image.Resampling.BOX)
    radius = rng.uniform(*cfg.blur)
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(*cfg.noise), size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def render_split(
    split: str, per_class: int, *, seed: int, cfg: GlyphConfig = GlyphConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``per_class`` glyphs of every class: images (62·n, 1, size, size) uint8, labels (62·n,) int64."""
    fonts = [str(p) for p in font_paths()]
    images = np.empty((len(CLASS_NAMES) * per_class, 1, cfg.size, cfg.size), dtype=np.uint8)
    for c, char in enumerate(CLASS_NAMES):
        rng = np.random.default_rng([seed, _SPLITS[split], c])
        for i in range(per_class):
            images[c * per_class + i, 0] = render_glyph(char, fonts[rng.integers(len(fonts))], rng, cfg)
    labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), per_class)
    return images, labels


def cache_dir(root: str | Path | None = None) -> Path:
    """Where generated glyphs are cached: ``root``, else ``$SPECIALKIT_CACHE``, else ``~/.cache/specialkit``."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("SPECIALKIT_CACHE", Path.home() / ".cache" / "specialkit"))


def _cache_key(sizes: dict[str, int], seed: int, cfg: GlyphConfig) -> str:
    import matplotlib
    import PIL

    desc = repr((_FORMAT_VERSION, sizes, seed, asdict(cfg), matplotlib.__version__, PIL.__version__))
    return hashlib.sha256(desc.encode()).hexdigest()[:12]


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(
            f"glyphs cache {path} is corrupt ({err}); delete it and the data will be generated again"
        ) from err


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_glyphs_hard(**kwargs: object) -> Dataset:
    """The ``glyphs_hard`` dataset: :func:`load_glyphs` drawn with :meth:`GlyphConfig.hard` (16 px, heavy
    distortion), for a regime where a small generalist reaches well under 90% top-1."""
    return load_glyphs(config=GlyphConfig.hard(), name="glyphs_hard", **kwargs)  # type: ignore[arg-type]


def load_glyphs(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_per_class: int | None = None,
    config: GlyphConfig = GlyphConfig(),
    cache: bool = True,
    name: str = "glyphs",
) -> Dataset:
    """Generate (or read from the cache) the ``glyphs`` dataset.

    Each split is drawn afresh: ``per_class`` training images per class (default 600),
    ``round(per_class · f / (1 − f))`` validation images per class for ``val_fraction`` f, and
    ``test_per_class`` test images (default: as many as validation). ``download`` is ignored
    (nothing to download). The default size (62 × 734 images) renders in seconds on one core.
    """
    del download
    n_train = 600 if per_class is None else int(per_class)
    if n_train < 1:
        raise DatasetError(f"glyphs: per_class must be at least 1, got {per_class}")
    n_val = max(1, round(n_train * val_fraction / (1.0 - val_fraction)))
    sizes = {"train": n_train, "val": n_val, "test": n_val if test_per_class is None else int(test_per_class)}
    path = cache_dir(root) / f"glyphs-{_cache_key(sizes, seed, config)}.npz"
    arrays = _read_cache(path) if cache else None
    if arrays is None:
        arrays = {}
        for split, n in sizes.items():
            arrays[f"x_{split}"], arrays[f"y_{split}"] = render_split(split, n, seed=seed, cfg=config)
        if cache:
            _write_cache(path, arrays)
    coarse = np.array([0] * 10 + [1] * 26 + [2] * 26, dtype=np.int64)
    return Dataset(
        name=name,
        class_names=CLASS_NAMES,
        **{k: torch.from_numpy(v) for k, v in arrays.items()},
        coarse_names=COARSE_NAMES,
        coarse_of_class=coarse,
        hflip=False,
    )
