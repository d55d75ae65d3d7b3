"""FITS cutouts → the uint8 RGB images the rest of the pipeline takes, through astropy.

A survey cutout (Legacy Surveys g/r/z, SDSS, HSC) holds sky-subtracted fluxes, as one (bands, H, W)
cube or as one 2-D image HDU per band. Its planes are numbered through the file: a cube gives one
per band, a 2-D image HDU one, HDUs without image data (an empty primary, tables) none. Three
planes, listed blue to red, are chosen (`bands`; by default the first image HDU's planes when it is
a cube, so a Legacy Surveys cutout with its inverse variances after it works as it is, else every
plane of the file; either way exactly three). Each is multiplied by its scale and becomes
R, G, B = reddest, middle, bluest, through one of two stretches with the same parameters:

- `lupton` (default): Lupton et al. (2004), astropy's `make_lupton_rgb`: the curve
  f(I) = asinh(Q·I/stretch)·0.1/asinh(0.1·Q) (1 = 255) of the bands' mean intensity I sets every
  band's brightness, so colours survive in bright cores (a saturated pixel keeps its hue).
- `asinh`: that same curve for each band on its own (astropy's `AsinhStretch` on a
  `ManualInterval`): bright cores turn white, as in an ordinary arcsinh display.

The minimum (black) is 0, the sky of a sky-subtracted cutout. Non-finite pixels (masked: NaN,
inf) are set to 0, the sky, before the stretch. Both stretches work pixel by pixel, with no
statistic of the image: a pixel's value does not depend on the cutout's size or on what else it
shows, so a cutout cropped before or after the stretch gives the same pixels.

The settings (`FitsStretch`) are recorded in the prepared file and the checkpoint, so that `infer`
and `predict` repeat them exactly. Kept free of torch: prepare's decoding workers import this.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import UserError

SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")
STRETCHES = ("lupton", "asinh")
MAX_Q = 1000.0  # far past any display's softening (Lupton: 8-20); keeps the asinh curve finite


class BadCutout(ValueError):
    """Why a FITS file cannot be used; the caller names the file."""


@dataclass(frozen=True)
class FitsStretch:
    """How a FITS cutout becomes RGB: its bands (plane numbers, blue to red; None: the file's own
    three), the per-band scales (same order), the stretch and its Q and linear stretch."""

    bands: tuple[int, int, int] | None = None
    stretch: str = "lupton"
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
    q: float = 8.0
    stretch_param: float = 0.5  # astropy's `stretch`: suits cutouts in nanomaggies

    def __post_init__(self) -> None:
        if self.stretch not in STRETCHES:
            raise UserError(f"--fits-stretch {self.stretch}: choose {' or '.join(STRETCHES)}")
        if self.bands is not None and (len(self.bands) != 3 or min(self.bands) < 0):
            raise UserError(f"--fits-bands {join(self.bands)}: give three plane numbers (0 = the first)")
        if len(self.scales) != 3 or not all(math.isfinite(s) and s > 0 for s in self.scales):
            raise UserError(f"--fits-scales {join(self.scales)}: give three positive numbers (blue to red)")
        if not (0 < self.q <= MAX_Q):
            raise UserError(f"--fits-q {self.q:g}: must be in (0, {MAX_Q:g}]")
        if not (math.isfinite(self.stretch_param) and self.stretch_param > 0):
            raise UserError(f"--fits-stretch-param {self.stretch_param:g}: must be a positive number")

    def describe(self) -> str:
        bands = join(self.bands) if self.bands else "auto"
        params = f"Q {self.q:g}, stretch {self.stretch_param:g}, scales {join(self.scales)}"
        return f"{self.stretch}, {params}, bands {bands}"

    def to_attrs(self) -> dict[str, object]:
        """As the prepared file's attributes."""
        return {
            "fits_stretch": self.stretch,
            "fits_bands": join(self.bands) if self.bands else "auto",
            "fits_scales": np.array(self.scales, dtype=np.float64),
            "fits_q": self.q,
            "fits_stretch_param": self.stretch_param,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> FitsStretch | None:
        """From a prepared file's attributes (None: not prepared from FITS)."""
        if "fits_stretch" not in attrs:
            return None
        bands = str(attrs["fits_bands"])
        return cls(
            bands=None if bands == "auto" else tuple(int(b) for b in bands.split(",")),
            stretch=str(attrs["fits_stretch"]),
            scales=tuple(float(s) for s in attrs["fits_scales"]),
            q=float(attrs["fits_q"]),
            stretch_param=float(attrs["fits_stretch_param"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """As plain values, for a checkpoint (loaded with weights_only=True)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FitsStretch:
        bands, scales = values["bands"], tuple(values["scales"])
        return cls(**{**values, "bands": tuple(bands) if bands else None, "scales": scales})


def join(values: Sequence[object]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def numbers(option: str, text: str, kind: type) -> tuple:
    """ "1,1.1,1.5" → three numbers of `kind`; anything else is one line naming the option."""
    try:
        values = tuple(kind(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        what = "plane numbers" if kind is int else "numbers"
        raise UserError(f"{option} {text}: give three {what}, comma-separated, blue to red")
    return values


def number(option: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{option} {text}: not a number") from None


def from_options(
    bands: str | None, stretch: str | None, scales: str | None, q: str | None, stretch_param: str | None
) -> FitsStretch | None:
    """prepare's --fits-* options (strings, as typed) → settings; None when none was given."""
    if all(v is None for v in (bands, stretch, scales, q, stretch_param)):
        return None
    default = FitsStretch()
    return FitsStretch(
        bands=default.bands if bands in (None, "auto") else numbers("--fits-bands", bands, int),
        stretch=default.stretch if stretch is None else stretch,
        scales=default.scales if scales is None else numbers("--fits-scales", scales, float),
        q=default.q if q is None else number("--fits-q", q),
        stretch_param=default.stretch_param
        if stretch_param is None
        else number("--fits-stretch-param", stretch_param),
    )


def is_fits(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(SUFFIXES)


def split_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name, a FITS double suffix (.fits.gz) kept whole."""
    suffix = next((s for s in SUFFIXES if name.lower().endswith(s)), None)
    return (name[: -len(suffix)], name[-len(suffix) :]) if suffix else os.path.splitext(name)


def kind_mismatch(path: str | os.PathLike, fits: FitsStretch | None) -> str | None:
    """Why a model cannot take this file (None: it can): a FITS cutout for a model trained without
    a FITS stretch, or another image for one trained with it; its pixels would not be training's."""
    if is_fits(path) and fits is None:
        return "a FITS cutout, but the model was trained on JPEG/PNG images (no FITS stretch recorded)"
    if not is_fits(path) and fits is not None:
        return f"not a FITS cutout, but the model was trained on FITS cutouts ({fits.describe()})"
    return None


def image_planes(hdus: Sequence[Any]) -> tuple[list[np.ndarray], int]:
    """Every 2-D plane of the file's image HDUs in order (float64), and how many the first holds."""
    planes: list[np.ndarray] = []
    first = 0
    for index, hdu in enumerate(hdus):
        data = hdu.data if hdu.is_image else None
        if data is None:
            continue
        if data.ndim not in (2, 3):
            raise BadCutout(
                f"HDU {index} holds a {data.ndim}-D image; expected 2-D bands or a (bands, H, W) cube"
            )
        cube = np.asarray(data, dtype=np.float64).reshape(-1, *data.shape[-2:])
        first = first or len(cube)
        planes.extend(cube)
    if not planes:
        raise BadCutout("no image data in any HDU")
    return planes, first


def read_bands(path: str | os.PathLike, bands: tuple[int, int, int] | None) -> np.ndarray:
    """The three chosen planes of a FITS file, blue to red, as float64 3×H×W."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy warns about a damaged file; the error says it
            with fits.open(path, memmap=False) as hdus:
                planes, first = image_planes(hdus)
    except (FileNotFoundError, BadCutout):
        raise
    except Exception as err:  # astropy's parsers raise many types over a damaged or foreign file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadCutout(f"not a readable FITS file ({reason})") from None
    if bands is None:
        chosen = planes[:first] if first > 1 else planes
        if len(chosen) != 3:
            raise BadCutout(
                f"has {len(chosen)} band planes, not 3 (choose three with prepare's --fits-bands)"
            )
    elif max(bands) >= len(planes):
        raise BadCutout(f"has {len(planes)} band planes, no plane {max(bands)} (--fits-bands {join(bands)})")
    else:
        chosen = [planes[b] for b in bands]
    if len({plane.shape for plane in chosen}) > 1:
        sizes = " and ".join(f"{p.shape[1]}×{p.shape[0]}" for p in chosen)
        raise BadCutout(f"its bands differ in size ({sizes})")
    return np.stack(chosen)


def stretch_rgb(bands: np.ndarray, settings: FitsStretch) -> np.ndarray:
    """float 3×H×W fluxes (blue to red) → uint8 H×W×3 RGB (R: the reddest band)."""
    from astropy.visualization import AsinhStretch, ManualInterval, make_lupton_rgb

    finite = np.isfinite(bands)
    if not finite.any():
        raise BadCutout("no finite pixels (every one NaN or infinite)")
    scaled = np.where(finite, bands, 0.0) * np.asarray(settings.scales)[:, None, None]
    blue, green, red = scaled
    q, linear = settings.q, settings.stretch_param
    if settings.stretch == "lupton":
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where the intensity is 0: black
            return make_lupton_rgb(red, green, blue, stretch=linear, Q=q)
    # AsinhStretch(a) on [0, white] is asinh(x/a)/asinh(1/a), x = v/white: Lupton's curve when
    # asinh(1/a) = 10·asinh(Q/10) (the curve reaches 1 at v = white) and white·a = stretch/Q.
    a = 1.0 / math.sinh(10.0 * math.asinh(q / 10.0))
    white = linear / (q * a)
    curve = AsinhStretch(a)(ManualInterval(0.0, white)(np.stack([red, green, blue], axis=-1)))
    return (curve * 255.0).astype(np.uint8)  # truncated, as make_lupton_rgb does


def read_rgb(path: str | os.PathLike, settings: FitsStretch) -> np.ndarray:
    """One FITS cutout → uint8 H×W×3. A missing file is FileNotFoundError; any other problem with
    the file (damaged, no image data, the wrong bands) is a BadCutout saying what."""
    return stretch_rgb(read_bands(path, settings.bands), settings)
