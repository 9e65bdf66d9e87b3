"""The report's calibration blocks: numbers and reliability diagrams, before and after.

One block per model (and one for the ensemble rule): the temperature the model was exported
with, the test split's ECE and NLL before (T = 1) and after temperature scaling, and two
reliability diagrams drawn as inline SVG (no matplotlib, nothing fetched): per confidence
bin a bar up to the bin's accuracy, the gap between the bin's accuracy and its mean
confidence in red (the gap ECE weighs by the bin's share of faces: a hatched band standing
on the bar where the model is over-confident, the bar's own top boxed in red where it is
under-confident, never a colour laid over the bar) and the diagonal a calibrated model would follow.
Each bar carries its bin's numbers as data-* attributes and each diagram the bins it draws
as inline JSON, so tests compare the picture with evaluation.json.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from fer_pipeline.core.html_page import esc, json_script, number

__all__ = ["calibration_block", "reliability_svg"]

SIZE = 220          # the plot square, in px
MARGIN = 34         # room for the axis labels


def _x(value: float) -> float:
    return MARGIN + value * SIZE


def _y(value: float) -> float:
    return MARGIN / 2 + (1.0 - value) * SIZE


BAR, GAP = "#1e63b5", "#c62828"
GAP_TINT = "#f6d4d2"  # the pale red between an over-confident band's stripes


def _hatch(pattern_id: str) -> str:
    """Red diagonal hatching on pale red, opaque: it never lies over the bar."""
    return (f'<pattern id="{esc(pattern_id)}" patternUnits="userSpaceOnUse" width="6" '
            f'height="6" patternTransform="rotate(45)"><rect width="6" height="6" '
            f'fill="{GAP_TINT}"/><rect width="2" height="6" fill="{GAP}"/></pattern>')


def _gap_band(name: str, left: float, width: float, accuracy: float,
              confidence: float) -> str:
    """The gap between a bin's accuracy and its mean confidence, drawn so that no colour
    is laid over the bar's blue (a semi-transparent red over it reads as purple).
    Over-confident (accuracy < confidence): a hatched band standing on the bar, from the
    accuracy up to the confidence. Under-confident (accuracy > confidence): the gap is the
    bar's own top, from the confidence up to the accuracy, boxed by a red outline and left
    blue inside, since hatching a band a few pixels tall over blue blurs into purple."""
    over = accuracy < confidence
    top, bottom = max(accuracy, confidence), min(accuracy, confidence)
    look = (f'fill="url(#{esc(name)}-hatch)" stroke-width="1"' if over
            else 'fill="none" stroke-width="2"')
    # crispEdges: an anti-aliased red edge on the blue bar would blend into purple.
    return (f'<rect class="gap" data-direction="{"over" if over else "under"}" '
            f'x="{left:.2f}" y="{_y(top):.2f}" width="{width:.2f}" '
            f'height="{(top - bottom) * SIZE:.2f}" {look} stroke="{GAP}" '
            'shape-rendering="crispEdges"/>')


def reliability_svg(name: str, title: str, bins: Sequence[Mapping[str, Any]]) -> str:
    """One reliability diagram: x = confidence, y = accuracy, one bar per non-empty bin."""
    parts = [f"<defs>{_hatch(f'{name}-hatch')}</defs>",
             f'<rect x="{_x(0)}" y="{_y(1)}" width="{SIZE}" height="{SIZE}" fill="#fafafa" '
             'stroke="#999"/>']
    for index, b in enumerate(bins):
        if not b["count"]:
            continue
        left, width = _x(b["lower"]), (b["upper"] - b["lower"]) * SIZE
        accuracy, confidence = b["accuracy"], b["confidence"]
        parts.append(
            f'<rect class="bar" data-bin="{index}" data-count="{b["count"]}" '
            f'data-accuracy="{accuracy!r}" data-confidence="{confidence!r}" '
            f'x="{left:.2f}" y="{_y(accuracy):.2f}" width="{width:.2f}" '
            f'height="{accuracy * SIZE:.2f}" fill="{BAR}" stroke="#fff">'
            f'<title>{b["lower"]:.2f}-{b["upper"]:.2f}: {b["count"]} faces, accuracy '
            f'{accuracy:.3f}, mean confidence {confidence:.3f}</title></rect>')
        parts.append(_gap_band(name, left, width, accuracy, confidence))
    # The diagonal last, so neither bars nor bands hide it.
    parts.append(f'<line x1="{_x(0)}" y1="{_y(0)}" x2="{_x(1)}" y2="{_y(1)}" stroke="#555" '
                 'stroke-dasharray="4 3"/>')
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{_x(tick)}" y="{_y(0) + 14}" font-size="10" '
                     f'text-anchor="middle">{tick:g}</text>')
        parts.append(f'<text x="{MARGIN - 4}" y="{_y(tick) + 3}" font-size="10" '
                     f'text-anchor="end">{tick:g}</text>')
    parts.append(f'<text x="{_x(0.5)}" y="{_y(0) + 28}" font-size="11" '
                 'text-anchor="middle">confidence</text>')
    parts.append(f'<text x="10" y="{_y(0.5)}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 10 {_y(0.5)})">accuracy</text>')
    width, height = MARGIN + SIZE + 8, MARGIN / 2 + SIZE + MARGIN + 4
    return (f'<figure class="chart" data-chart="{esc(name)}"><svg xmlns="http://www.w3.org/2000/svg" '
            f'role="img" aria-label="{esc(title)}" width="{width}" height="{height:g}" '
            f'viewBox="0 0 {width} {height:g}" data-reliability="{esc(name)}">'
            + "".join(parts) + f"</svg><figcaption>{esc(title)}</figcaption>"
            + json_script(list(bins), "data-chart-data", name) + "</figure>")


def _temperature(value: Optional[float], path: str) -> str:
    if value is None:
        return f'<span data-path="{esc(path)}" data-missing="1">not fitted (T = 1)</span>'
    return number(value, path)


def calibration_block(name: str, calibration: Optional[Mapping[str, Any]], path: str) -> str:
    """The block for one model (`path`: where `calibration` sits in evaluation.json)."""
    if not calibration:
        return '<p class="muted">No calibration numbers (evaluated before calibration).</p>'
    stats = "".join(
        f'<span class="stat">{label} <b>{number(calibration[when][key], f"{path}/{when}/{key}")}'
        "</b></span>"
        for when, when_label in (("before", "before"), ("after", "after"))
        for key, label in (("ece", f"ECE {when_label}"), ("nll", f"NLL {when_label}")))
    temperature = ("" if "temperature" not in calibration else
                   f'<span class="stat">temperature <b>'
                   f"{_temperature(calibration['temperature'], path + '/temperature')}</b></span>")
    bins = calibration.get("bins_count", len(calibration["after"]["bins"]))
    return (f"<div>{temperature}{stats}</div>"
            f'<p class="muted">Expected calibration error over {bins} equal-width confidence '
            "bins of the test split: bars are each bin's accuracy, red the gap to its mean "
            "confidence (a hatched band above the bar: over-confident; the bar's top boxed "
            "in red: under-confident), the dashed diagonal a perfectly calibrated model.</p>"
            '<div class="row">'
            + reliability_svg(f"reliability-{name}-before",
                              f"{name}: before temperature scaling (T = 1)",
                              calibration["before"]["bins"])
            + reliability_svg(f"reliability-{name}-after",
                              f"{name}: after temperature scaling (served)",
                              calibration["after"]["bins"])
            + "</div>")
