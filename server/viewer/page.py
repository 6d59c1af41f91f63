"""The λ viewer's HTML page: one self-contained file, no scripts, no external resources.

The template (``templates/page.html.j2``) escapes everything it prints
(jinja2 autoescape), so source text full of ``<``, ``&`` and quotes shows as
written. Colours are worked out here so that the legend and the chunks use one
mapping: a skipped chunk is grey; an updated chunk is orange, darker as λ
grows, on a square-root scale so that the small λ a gate often gives stay
visible.
"""

from __future__ import annotations

import math

import jinja2

from ponder.server.viewer.data import Inspection

SKIPPED_COLOUR = "#e3e7ec"


def lambda_colour(lam: float, lambda_max: float) -> str:
    """The background of an updated chunk with gate scale ``lam``."""
    share = math.sqrt(min(max(lam / lambda_max, 0.0), 1.0))
    return f"hsl(30, 95%, {88 - 33 * share:.1f}%)"


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _flops(value: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


_environment = jinja2.Environment(
    loader=jinja2.PackageLoader("ponder.server.viewer", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.filters["number"] = _number
_environment.filters["flops"] = _flops


def render_html(inspection: Inspection, note: str = "") -> str:
    """The page for ``inspection``.

    Args:
      inspection: from ``ponder.server.viewer.data.inspect_tokens`` (or ``inspect_file``).
      note: a line shown under the title (where the numbers come from).

    Returns:
      The HTML document, as text.
    """
    i = inspection
    colour = lambda c: lambda_colour(c.lam, i.lambda_max) if c.updated else SKIPPED_COLOUR
    ticks = [i.threshold, *(i.lambda_max * k / 4 for k in range(1, 5))]
    legend = {
        "gradient": ", ".join(f"{lambda_colour(t, i.lambda_max)} {100 * t / i.lambda_max:.1f}%" for t in ticks),
        "ticks": [(f"{t:g}", 100 * t / i.lambda_max) for t in ticks],
        "skipped": SKIPPED_COLOUR,
    }
    gain = None if i.ce is None or i.ce_skip is None else i.ce_skip - i.ce
    chunks = [
        {"view": c, "text": i.text[c.char_start : c.char_end], "colour": colour(c),
         "delta": None if c.ce is None or c.ce_skip is None else c.ce_skip - c.ce}
        for c in i.chunks
    ]
    return _environment.get_template("page.html.j2").render(
        i=i, chunks=chunks, legend=legend, gain=gain, note=note,
        flops_share=i.ttt_flops / i.update_1_flops if i.update_1_flops else 0.0,
    )
