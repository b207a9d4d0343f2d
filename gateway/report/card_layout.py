"""Text layout of the result card: fonts, glyph coverage, and fitting every string into its box.

Every string the card prints goes through ``fit`` (wrap at spaces, shrink the font until the lines
fit the box; a word is never cut) and is recorded in a ``Layout``, so a test can read back exactly
what was drawn where and check, with the font's own metrics, that nothing crosses its box. Text a
host's fonts cannot draw (a CJK patient name without a CJK font) is replaced by a plain statement,
never drawn as empty boxes (mojibake).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from PIL import ImageDraw, ImageFont

_SCALABLE = (".ttf", ".otf", ".ttc")
# Where Debian (fonts-dejavu-core), Red Hat and Alpine put DejaVu Sans, for hosts without fc-match.
_FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path("/usr/share/fonts/truetype"))
MIN_SIZE = 14
NOT_SHOWN = "(not shown: characters this host's fonts cannot draw; see the SR)"


class FontUnavailable(RuntimeError):
    """No scalable font on this host: the card would be unreadable, so none is made."""


def _fontconfig(pattern: str) -> Path | None:
    if shutil.which("fc-match") is None:
        return None
    try:
        found = subprocess.run(["fc-match", "--format=%{file}", pattern], capture_output=True, text=True,
                               timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = Path(found) if found else None
    return path if path and path.suffix.lower() in _SCALABLE and path.is_file() else None


def _font_dirs(bold: bool) -> Path | None:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for root in _FONT_DIRS:
        if root.is_dir():
            found = next(iter(sorted(root.rglob(name))), None)
            if found is not None:
                return found
    return None


@functools.cache
def find_font(bold: bool = False) -> Path:
    """A scalable sans-serif font file: DejaVu Sans via fontconfig, else the usual font folders.

    Parameters
    ----------
    bold : bool
        The bold face.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FontUnavailable
        When no scalable font is installed (rather than a bitmap fallback).
    """
    pattern = "DejaVu Sans:bold" if bold else "DejaVu Sans"
    path = _fontconfig(pattern) or _font_dirs(bold)
    if path is None:
        raise FontUnavailable(
            "no scalable font found for the result card: install the Debian package fonts-dejavu-core "
            "(and fontconfig), or set [report] result_card = false"
        )
    return path


@functools.cache
def find_cjk_font() -> Path | None:
    """A font with Chinese, Japanese and Korean glyphs when one is installed (fonts-noto-cjk,
    fonts-wqy-*), else None.

    Returns
    -------
    pathlib.Path or None
    """
    path = _fontconfig(":lang=zh")
    return path if path is not None and _covers_path(path, "中文") else None


@functools.cache
def _cmap(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTCollection, TTFont

    if path.suffix.lower() == ".ttc":
        fonts = TTCollection(str(path)).fonts[:1]
    else:
        fonts = [TTFont(str(path), lazy=True)]
    return frozenset(fonts[0].getBestCmap() or {})


def _covers_path(path: Path, text: str) -> bool:
    cmap = _cmap(path)
    return all(ord(c) in cmap or c.isspace() for c in text)


def covers(text: str, bold: bool = False) -> bool:
    """Whether DejaVu Sans has a glyph for every character of ``text``.

    Parameters
    ----------
    text : str
        The text.
    bold : bool
        The bold face.

    Returns
    -------
    bool
    """
    return _covers_path(find_font(bold), text)


@functools.cache
def font(size: int, bold: bool = False, cjk: bool = False) -> ImageFont.FreeTypeFont:
    """The card's font at ``size`` px (``cjk``: the CJK fallback font, when installed).

    Parameters
    ----------
    size : int
        Pixels.
    bold : bool
        Bold face.
    cjk : bool
        The CJK fallback font (when installed).

    Returns
    -------
    PIL.ImageFont.FreeTypeFont

    Raises
    ------
    FontUnavailable
        Without a scalable font.
    """
    path = find_cjk_font() if cjk else None
    return ImageFont.truetype(str(path or find_font(bold)), size)


def drawable(text: str, bold: bool = False) -> tuple[str, bool]:
    """(text to draw, whether to use the CJK font): the text itself when a font covers it, else
    ``NOT_SHOWN``.

    Parameters
    ----------
    text : str
        The text.
    bold : bool
        Bold face.

    Returns
    -------
    tuple of (str, bool)
    """
    if covers(text, bold):
        return text, False
    cjk = find_cjk_font()
    if cjk is not None and _covers_path(cjk, text):
        return text, True
    return NOT_SHOWN, False


@dataclass(frozen=True)
class Placed:
    """One string as laid out: its box, its lines, the font size, and the source text."""

    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    lines: tuple[str, ...]
    size: int
    bold: bool
    cjk: bool = False

    def widths(self) -> list[float]:
        """Each line's advance width in the font it was drawn with."""
        f = font(self.size, self.bold, self.cjk)
        return [f.getlength(line) for line in self.lines]


@dataclass
class Layout:
    """Everything the card printed (``Placed`` items in drawing order)."""

    items: list[Placed] = field(default_factory=list)

    def text(self) -> str:
        """All printed lines, one per line."""
        return "\n".join(line for item in self.items for line in item.lines)


def _wrap(text: str, f: ImageFont.FreeTypeFont, width: int) -> list[str] | None:
    """Lines of ``text`` wrapped at spaces within ``width``; None when one word alone is wider."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        if f.getlength(word) > width:
            return None
        trial = f"{current} {word}".strip()
        if f.getlength(trial) <= width:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def fit(text: str, width: int, height: int, size: int, bold: bool = False,
        min_size: int = MIN_SIZE, spacing: float = 1.2) -> tuple[list[str], int, bool, str]:
    """Wrap ``text`` at spaces and shrink it from ``size`` until it fits ``width`` x ``height``.

    Parameters
    ----------
    text : str
        The string (one paragraph).
    width, height : int
        The box in pixels.
    size : int
        The preferred font size.
    bold : bool
        Bold face.
    min_size : int
        The smallest size tried; below it the box height is exceeded rather than a word cut
        (callers give boxes that the longest real strings fit; the layout test checks it).
    spacing : float
        Line height as a multiple of the font size.

    Returns
    -------
    tuple
        (lines, size, cjk, drawn text).
    """
    shown, cjk = drawable(" ".join(text.split()), bold)
    current = size
    while True:
        f = font(current, bold, cjk)
        lines = _wrap(shown, f, width)
        fits = lines is not None and len(lines) * int(current * spacing) <= max(height, int(current * spacing))
        if fits or current <= min_size:
            break
        current -= 1
    if lines is None:  # a single unbreakable word wider than the box at the smallest size
        shown, cjk = NOT_SHOWN, False
        lines = _wrap(shown, font(current, bold), width) or [shown]
    return lines, current, cjk, shown


def place(draw: ImageDraw.ImageDraw, layout: Layout, text: str, box: tuple[int, int, int, int], size: int,
          fill: tuple[int, int, int], bold: bool = False, spacing: float = 1.2, align: str = "left") -> int:
    """Fit ``text`` into ``box``, draw it, record it; returns the y below the last line.

    Parameters
    ----------
    draw : PIL.ImageDraw.ImageDraw
        The card.
    layout : Layout
        Where the placed text is recorded.
    text : str
        The string.
    box : tuple of int
        (x0, y0, x1, y1).
    size : int
        The preferred font size.
    fill : tuple of int
        RGB colour.
    bold : bool
        Bold face.
    spacing : float
        Line height factor.
    align : str
        "left" or "right".

    Returns
    -------
    int
    """
    x0, y0, x1, y1 = box
    lines, used, cjk, shown = fit(text, x1 - x0, y1 - y0, size, bold, spacing=spacing)
    f = font(used, bold, cjk)
    y = y0
    for line in lines:
        x = x1 - f.getlength(line) if align == "right" else x0
        draw.text((x, y), line, font=f, fill=fill)
        y += int(used * spacing)
    layout.items.append(Placed(shown, box, tuple(lines), used, bold, cjk))
    return y
