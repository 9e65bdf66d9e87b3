"""The two pages a person opens, rendered in headless Chromium from small real runs.

The statistics page comes from run_statistics over a few hand-written TFRecords (with
rejected rows, a duplicate and an augmented split); the report from run_evaluator over tiny
real SavedModels (tests/test_evaluator.py). For each page: nothing is requested off the
machine, every image decodes and is not blank, every number shown equals the JSON it came
from, and every chart's embedded points equal that JSON (training curves included), with
the curves' colours actually present in their image. The tamper tests show the checks
fail on a changed number and on an empty plot.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fer_pipeline.core.config import EvalConfig
from fer_pipeline.core.contract import CLASS_NAMES
from tests import browser
from tests import test_evaluator as evaluator_fixtures
from tests import test_statistics as statistics_fixtures

# matplotlib's first two default colours: the train and validation curves.
TRAIN_COLOR, VALIDATION_COLOR = (31, 119, 180), (255, 127, 14)


@pytest.fixture(autouse=True)
def _needs_chromium():
    browser.chromium_or_skip()


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def report_run(tmp_path_factory) -> dict[str, Any]:
    from fer_pipeline.components.evaluator import run_evaluator

    root = tmp_path_factory.mktemp("report")
    evaluator_fixtures.write_test_split(root / "examples", n=210)
    models = root / "models"
    dirs = {"good": evaluator_fixtures.make_model_dir(models, "good", shift=0, scale=3.0),
            "bad": evaluator_fixtures.make_model_dir(models, "bad", shift=6, scale=2.0)}
    serving = root / "serving"          # "good" is already served as version 1
    shutil.copytree(Path(dirs["good"]) / "serving_model", serving / "good" / "1")
    result = run_evaluator(str(root / "examples"), dirs, str(serving), str(root / "evaluation"),
                           EvalConfig(min_accuracy={"good": 0.7, "bad": 0.1}))
    return {"html": result.report_path,
            "evaluation": json.loads(Path(result.evaluation_path).read_text()),
            "blessings": json.loads(Path(result.blessings_path).read_text()),
            "histories": {n: json.loads((Path(d) / "history.json").read_text())
                          for n, d in dirs.items()}}


@pytest.fixture(scope="module")
def statistics_run(tmp_path_factory) -> dict[str, Any]:
    import tensorflow_data_validation as tfdv

    from fer_pipeline.components.statistics.executor import run_statistics

    root = tmp_path_factory.mktemp("statistics")
    examples = str(root / "examples")
    labels = statistics_fixtures.balanced_labels
    # No uniform black/white faces here: every face on the page must be a real picture.
    for split, n, seed in (("train", 70, 1), ("validation", 35, 2), ("test", 35, 3)):
        statistics_fixtures.write_split(examples, split, labels(n), seed=seed, extremes=False)
    statistics_fixtures.write_ingest_reports(examples)
    augmented = str(root / "augmented")
    statistics_fixtures.write_augmented(augmented, examples, copies_of_class=1, copies=6)
    result = run_statistics(examples, augmented, statistics_fixtures.SCHEMA,
                            str(root / "statistics"), None, [])
    stats = {split: tfdv.load_statistics(path) for split, path in result.stats_paths.items()}
    stats["augmented"] = tfdv.load_statistics(result.augmented_stats_path)
    return {"html": result.html_path, "stats": stats}


# ----------------------------------------------------------------------------- checks

def resolve(source: Any, path: str) -> Any:
    for key in path.split("/"):
        source = source[int(key)] if isinstance(source, list) else source[key]
    return source


def number_mismatches(numbers: list[dict], source: Any) -> list[str]:
    """Numbers whose text differs from their source value, formatted as the page does."""
    wrong = []
    for shown in numbers:
        value = resolve(source, shown["path"])
        if shown["missing"]:
            expected = "n/a" if value is None else f"a number ({value})"
            if value is not None:
                wrong.append(f"{shown['path']}: page says n/a, JSON has {value}")
            continue
        scale, digits = float(shown["scale"]), int(shown["digits"])
        expected = f"{value * scale:.{digits}f}" + (" %" if scale == 100 else "")
        if shown["text"] != expected:
            wrong.append(f"{shown['path']}: page says {shown['text']!r}, JSON {expected!r}")
    return wrong


def check_page_basics(opened: browser.OpenedPage, min_images: int) -> list[dict]:
    """No request off the machine, no console error, every image decoded and not blank."""
    assert opened.remote_requests() == []
    assert all(url.startswith(browser.LOCAL_SCHEMES) for url in opened.requests)
    assert opened.console_errors == []
    images = browser.image_states(opened.page)
    assert len(images) >= min_images
    for image in images:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image["src"][:60]
        assert not browser.is_blank(browser.decode_data_uri_png(image["src"])), image["chart"]
    return images


def check_screenshot(opened: browser.OpenedPage, path: Path) -> None:
    opened.page.screenshot(path=str(path), full_page=True)
    from PIL import Image

    shot = np.asarray(Image.open(path))
    assert shot.shape[0] > browser.VIEWPORT["height"]      # the whole page, not one screen
    assert not browser.is_blank(shot)


def colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    distance = np.abs(pixels[..., :3].astype(int) - np.array(rgb)).sum(axis=-1)
    return int((distance <= tolerance).sum())


def expected_curves(history: dict) -> dict[str, list]:
    """What the curves must plot, straight from history.json's per-epoch records."""
    records = history["epochs"]
    return {"epoch": [r["epoch"] for r in records],
            **{key: [r[key] for r in records]
               for key in ("loss", "val_loss", "accuracy", "val_accuracy")}}


# ----------------------------------------------------------------------------- report

def test_report_in_a_real_browser(report_run, tmp_path):
    evaluation = report_run["evaluation"]
    with browser.open_page(report_run["html"]) as opened:
        page = opened.page
        images = check_page_basics(opened, min_images=8)
        check_screenshot(opened, tmp_path / "report.png")

        numbers = browser.shown_numbers(page)
        assert len(numbers) > 40 and all(n["visible"] for n in numbers)
        assert number_mismatches(numbers, evaluation) == []

        charts = browser.chart_data(page)
        for name, model in evaluation["models"].items():
            assert charts[f"history-{name}"] == expected_curves(report_run["histories"][name])
            assert charts[f"per-class-{name}"] == {
                "classes": list(CLASS_NAMES),
                **{m: [row[m] for row in model["per_class"]]
                   for m in ("precision", "recall", "f1")}}
            assert charts[f"confusion-{name}"] == {"matrix": model["confusion_matrix"]}
            curve = next(i for i in images if i["chart"] == f"history-{name}")
            pixels = browser.decode_data_uri_png(curve["src"])
            assert colour_pixels(pixels, TRAIN_COLOR) > 200        # the curves are drawn
            assert colour_pixels(pixels, VALIDATION_COLOR) > 200
        assert charts["confusion-ensemble"] == {"matrix": evaluation["ensemble"]["confusion_matrix"]}
        assert charts["test-distribution"]["counts"] == [
            evaluation["data"]["class_distribution"][c] for c in CLASS_NAMES]

        verdicts = page.eval_on_selector_all(
            "#verdict [data-blessed]", "els => els.map(e => [e.dataset.model, e.dataset.blessed])")
        assert dict(verdicts) == {n: str(b["blessed"]).lower()
                                  for n, b in report_run["blessings"].items()}
        assert evaluation["ensemble_blessed"]["models"] == ["good"]   # "bad" is held back
        assert any(n["path"] == "ensemble_blessed/accuracy" for n in numbers)
        banner = page.inner_text("#verdict")
        for blessing in report_run["blessings"].values():
            assert blessing["summary"] in banner
        assert "version 1" in banner                       # what is in serving now

        for name, model in evaluation["models"].items():
            for class_name, items in model["mistakes"].items():
                shown = page.eval_on_selector_all(
                    f'[data-gallery="mistakes-{name}-{class_name}"] .face',
                    "els => els.map(e => Number(e.dataset.index))")
                assert shown == [item["index"] for item in items]
        for gallery, key in (("review", "review_examples"), ("closest", "closest_calls")):
            shown = page.eval_on_selector_all(f'[data-gallery="{gallery}"] .face',
                                              "els => els.map(e => Number(e.dataset.index))")
            assert shown == [item["index"] for item in evaluation["ensemble"][key]]
        assert evaluation["ensemble"]["closest_calls"]
        check_reliability_diagrams(page, evaluation, charts)


def check_reliability_diagrams(page, evaluation: dict, charts: dict) -> None:
    """Per model and for the ensemble, before and after temperature scaling: an inline SVG
    whose bars are the non-empty bins of evaluation.json (count, accuracy, confidence),
    drawn (a real box on the page) and as tall as the bin's accuracy, each with its gap band
    (check_gap_bands)."""
    blocks = {**{name: model["calibration"] for name, model in evaluation["models"].items()},
              "ensemble": evaluation["ensemble"]["calibration"]}
    seen: set[str] = set()
    for name, calibration in blocks.items():
        for when in ("before", "after"):
            chart = f"reliability-{name}-{when}"
            bins = calibration[when]["bins"]
            assert charts[chart] == bins
            bars = page.eval_on_selector_all(
                f'svg[data-reliability="{chart}"] rect.bar',
                "els => els.map(e => ({bin: Number(e.dataset.bin), count: Number(e.dataset.count),"
                " accuracy: Number(e.dataset.accuracy), confidence: Number(e.dataset.confidence),"
                " height: e.getBBox().height}))")
            filled = [(i, b) for i, b in enumerate(bins) if b["count"]]
            assert [bar["bin"] for bar in bars] == [i for i, _ in filled] != []
            for bar, (_, b) in zip(bars, filled):
                assert (bar["count"], bar["accuracy"], bar["confidence"]) == (
                    b["count"], pytest.approx(b["accuracy"]), pytest.approx(b["confidence"]))
                assert bar["height"] == pytest.approx(b["accuracy"] * 220, abs=0.02)
            box = page.eval_on_selector(f'svg[data-reliability="{chart}"]',
                                        "e => e.getBoundingClientRect().width")
            assert box > 100
            seen.update(check_gap_bands(page, chart, [b for _, b in filled]))
    # The fixture's models are over-confident in some bins and under-confident in others.
    assert seen == {"over", "under"}


BAR_BLUE, GAP_RED = (30, 99, 181), (198, 40, 40)
# What the old 35 %-opaque red band over the blue bar looked like: the colour mix to avoid.
MIXED = tuple(round(0.65 * b + 0.35 * r) for b, r in zip(BAR_BLUE, GAP_RED))


def check_gap_bands(page, chart: str, bins: list[dict],
                    sampled: set[str] | None = None) -> set[str]:
    """Each bin's gap band spans its accuracy and mean confidence (220 px = 1.0), as wide
    as its bar; an over-confident band stands on the bar without covering any of it, an
    under-confident one is the bar's top. On the screen: an over-confident band is red
    hatching with no blue in it; an under-confident one a red box around the bar's top,
    blue inside; never the blend a semi-transparent red over blue makes. Returns the
    directions seen; adds to `sampled` those whose pixels were checked."""
    sampled = set() if sampled is None else sampled
    geometry = ("els => els.map(e => { const b = e.getBBox(); return {x: b.x, y: b.y, "
                "width: b.width, height: b.height, direction: e.dataset.direction}; })")
    svg = f'svg[data-reliability="{chart}"]'
    bars = page.eval_on_selector_all(f"{svg} rect.bar", geometry)
    gaps = page.eval_on_selector_all(f"{svg} rect.gap", geometry)
    assert len(gaps) == len(bars) == len(bins)
    from PIL import Image
    import io

    pixels = np.asarray(Image.open(io.BytesIO(page.locator(svg).screenshot())).convert("RGB"))
    directions = set()
    for bar, gap, b in zip(bars, gaps, bins):
        accuracy, confidence = b["accuracy"], b["confidence"]
        assert (gap["x"], gap["width"]) == (pytest.approx(bar["x"], abs=0.01),
                                            pytest.approx(bar["width"], abs=0.01))
        assert gap["height"] == pytest.approx(abs(accuracy - confidence) * 220, abs=0.02)
        bar_bottom = bar["y"] + bar["height"]
        if accuracy < confidence:       # over-confident: on top of the bar, not over it
            assert gap["direction"] == "over"
            assert gap["y"] + gap["height"] == pytest.approx(bar["y"], abs=0.02)
        else:                           # under-confident: the bar's own top
            assert gap["direction"] == "under"
            assert gap["y"] == pytest.approx(bar["y"], abs=0.02)
            assert gap["y"] + gap["height"] <= bar_bottom + 0.02
        directions.add(gap["direction"])
        # What a person sees inside the band (its 1 px border and the bars' white edges
        # left out); bands under 12 px tall have too small an inside to sample.
        if gap["height"] < 12:
            continue
        sampled.add(gap["direction"])
        top, bottom = int(gap["y"]), int(gap["y"] + gap["height"])
        columns = slice(int(gap["x"]) + 3, int(gap["x"] + gap["width"]) - 2)
        share = {name: colour_pixels(pixels[top + 3:bottom - 2, columns], rgb, tolerance=30)
                 / pixels[top + 3:bottom - 2, columns, 0].size
                 for name, rgb in (("blue", BAR_BLUE), ("red", GAP_RED), ("mixed", MIXED))}
        assert share["mixed"] == 0, (chart, b, share)
        if gap["direction"] == "over":
            assert share["red"] > 0.1 and share["blue"] == 0, (chart, b, share)
        else:
            assert share["blue"] > 0.9, (chart, b, share)
            for edge in (pixels[top:top + 1, columns], pixels[bottom - 1:bottom + 1, columns]):
                assert colour_pixels(edge, GAP_RED, tolerance=30) >= edge[..., 0].size / 2
    return directions


def test_reliability_gap_bands_read_without_mixing(tmp_path):
    """The report's fixture models are confident (their gaps are a few px), so the diagram
    is also drawn from bins with large gaps both ways and checked pixel by pixel."""
    from fer_pipeline.core.calibration_page import reliability_svg

    rows = [(5, 0.40, 0.15), (8, 0.10, 0.26), (10, 0.60, 0.35), (12, 0.30, 0.45),
            (20, 0.70, 0.55), (30, 0.50, 0.65), (40, 0.90, 0.75), (50, 0.70, 0.85)]
    bins = [{"lower": i / 10, "upper": (i + 1) / 10, "count": n, "accuracy": accuracy,
             "confidence": confidence} for i, (n, accuracy, confidence) in enumerate(rows, 1)]
    page_path = tmp_path / "reliability.html"
    page_path.write_text("<!doctype html><body>" + reliability_svg("wide", "wide gaps", bins)
                         + "</body>")
    with browser.open_page(page_path) as opened:
        assert opened.console_errors == []
        sampled: set[str] = set()
        assert check_gap_bands(opened.page, "wide", bins, sampled) == {"over", "under"}
    assert sampled == {"over", "under"}


def test_report_checks_catch_a_changed_number_and_an_empty_plot(report_run, tmp_path):
    from fer_pipeline.core.html_page import pyplot
    from fer_pipeline.core.report_page import history_charts

    evaluation = report_run["evaluation"]
    accuracy = evaluation["models"]["good"]["accuracy"]
    html = Path(report_run["html"]).read_text()
    shown = f'data-path="models/good/accuracy" data-digits="3" data-scale="1">{accuracy:.3f}<'
    assert shown in html
    tampered = tmp_path / "tampered.html"
    tampered.write_text(html.replace(shown, shown.replace(f"{accuracy:.3f}<", "0.999<")))
    with browser.open_page(tampered) as opened:
        assert number_mismatches(browser.shown_numbers(opened.page), evaluation) != []

    # A history without epochs plots nothing: no curve chart is emitted at all ...
    assert "data-chart" not in history_charts("good", {"epochs": []})
    # ... and axes without lines carry none of the curves' colours.
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 3))
    axes.set_title("empty")
    from fer_pipeline.core.html_page import figure_png
    empty = browser.decode_data_uri_png(figure_png(figure))
    assert colour_pixels(empty, TRAIN_COLOR) == 0 and colour_pixels(empty, VALIDATION_COLOR) == 0


# ----------------------------------------------------------------------------- statistics page

def tfdv_labels(stats) -> list[int]:
    from fer_pipeline.components.statistics.page_data import label_counts

    counts = label_counts(stats)
    return [counts[c] for c in CLASS_NAMES]


def test_statistics_page_in_a_real_browser(statistics_run, tmp_path):
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import statistics_pb2

    stats = statistics_run["stats"]
    with browser.open_page(statistics_run["html"]) as opened:
        page = opened.page
        check_page_basics(opened, min_images=30)
        check_screenshot(opened, tmp_path / "statistics.png")
        source = json.loads(page.text_content('script[data-source="page"]'))

        numbers = browser.shown_numbers(page)
        assert len(numbers) > 30 and all(n["visible"] for n in numbers)
        assert number_mismatches(numbers, source) == []

        charts = browser.chart_data(page)
        for split in ("train", "validation", "test"):
            assert charts[f"labels-{split}"]["counts"] == tfdv_labels(stats[split])
            pixels = tfdv.get_feature_stats(stats[split].datasets[0],
                                            tfdv.FeaturePath(["pixels"])).num_stats
            standard = [h for h in pixels.histograms
                        if h.type == statistics_pb2.Histogram.STANDARD][0]
            assert [b["count"] for b in charts[f"pixels-{split}"]["buckets"]] == [
                b.sample_count for b in standard.buckets]
            assert len(standard.buckets) > 1
            means = page.eval_on_selector_all(f'[data-gallery="mean-{split}"] .face',
                                              "els => els.map(e => e.dataset.className)")
            assert means == list(CLASS_NAMES)
            for class_name in CLASS_NAMES:
                samples = page.eval_on_selector_all(
                    f'[data-gallery="samples-{split}-{class_name}"] .face',
                    "els => els.map(e => Number(e.dataset.row))")
                assert samples == source["splits"][split]["sample_rows"][class_name]
                assert len(samples) == min(8, source["splits"][split]["labels"][class_name])
        assert charts["augmented-counts"] == {"before": tfdv_labels(stats["train"]),
                                              "after": tfdv_labels(stats["augmented"])}
        assert len(page.query_selector_all('[data-gallery="augmented"] .pair')) == \
            len(source["augmented"]["pairs"]) > 0
        assert len(page.query_selector_all('[data-gallery="duplicates"] .face img')) == 1
        verdict = page.inner_text("#verdict")
        assert "no anomalies, no label drift" in verdict
        rejected = page.inner_text("body")
        assert "wrong_pixel_count" in rejected and "duplicate_of_train_row" in rejected


# ------------------------------------------------------------------ the docs' pictures

def _committed(run: Path, step_dir: str) -> Path:
    """The execution directory a step's COMMIT.json names (core/artifacts.py)."""
    return Path(json.loads((run / step_dir / "COMMIT.json").read_text())["uri"])


DOCS_PAGES = {   # picture name -> (the page under a demo run, images it shows at least)
    "statistics": (lambda run: _committed(run, "statistics") / "statistics.html", 10),
    "report": (lambda run: _committed(run, "infra_validation") / "report.html", 5),
    "monitoring": (lambda run: run / "monitoring" / "demo" / "monitoring.html", 3),
}


@pytest.mark.parametrize("name", sorted(DOCS_PAGES))
def test_docs_image_of_the_demo_run(name):
    """`make docs-images`: the demo run's page, checked as above (nothing fetched, every
    image decodes and is not blank), saved as docs/images/<name>.png."""
    run, images = browser.docs_run_or_skip()
    locate, min_images = DOCS_PAGES[name]
    with browser.open_page(locate(run), {"width": 1280, "height": 900}) as opened:
        check_page_basics(opened, min_images)
        png = opened.page.screenshot(full_page=True)
    size = browser.save_docs_image(png, images / f"{name}.png")
    assert 0 < size <= browser.DOCS_IMAGE_MAX_BYTES, size
