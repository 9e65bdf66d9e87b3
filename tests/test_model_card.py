"""The model card `push` publishes with every version (core/model_card.py, model_card_page.py).

Read from the session's smoke run (which pushed its blessed models): model_card.json is
valid against Model Card Toolkit's schema and holds the run's own numbers (evaluation,
ingest, augmentation, gate, infra validation); model_card.html shows them in headless
Chromium with nothing loaded from elsewhere; the push step's report links to each card.
A push into a fresh serving root shows the card is inside the version when it appears.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest

from fer_pipeline.core.contract import CLASS_NAMES, PUSH_FILE, REPORT_HTML
from fer_pipeline.core.model_card import CARD_DIR, CARD_HTML, CARD_JSON, card_schema
from fer_pipeline.core.model_card_page import confusion_matrix
from tests import browser


def _commit_uri(run_root: str, directory: str) -> Path:
    return Path(json.loads(Path(run_root, directory, "COMMIT.json").read_text())["uri"])


def _manifest(run_root: str, directory: str) -> dict:
    return json.loads((_commit_uri(run_root, directory) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def cards(smoke_run) -> dict:
    push = json.loads((_commit_uri(smoke_run.run_root, "push") / PUSH_FILE).read_text())
    pushed = {name: m for name, m in push["models"].items() if m["pushed"]}
    assert "cnn" in pushed, "the smoke run pushes its CNN"
    return {name: {"json": json.loads(Path(m["path"], CARD_DIR, CARD_JSON).read_text()),
                   "html": Path(m["path"], CARD_DIR, CARD_HTML), "push": m}
            for name, m in pushed.items()}


def _metric(card: dict, type_: str, slice_: str | None = None) -> float:
    [value] = [m["value"] for m in card["quantitative_analysis"]["performance_metrics"]
               if m["type"] == type_ and m.get("slice") == slice_]
    return float(value)


def test_each_card_is_valid_and_holds_the_run_s_numbers(smoke_run, cards):
    root = smoke_run.run_root
    evaluation = json.loads((_commit_uri(root, "evaluation") / "evaluation.json").read_text())
    infra = json.loads((_commit_uri(root, "infra_validation") /
                        "infra_blessings.json").read_text())
    ingest = _manifest(root, "examples")["result"]
    augment = _manifest(root, "augmented")["result"]
    for name, found in cards.items():
        card = found["json"]
        jsonschema.Draft7Validator(card_schema()).validate(card)
        assert set(card) == {"schema_version", "model_details", "model_parameters",
                             "quantitative_analysis", "considerations"}
        model = evaluation["models"][name]
        assert card["model_details"]["version"]["name"] == str(found["push"]["version"])
        assert _metric(card, "accuracy", "test") == model["accuracy"]
        for row in model["per_class"]:
            for key in ("precision", "recall", "f1", "support"):
                assert _metric(card, key, f"class={row['class_name']}") == row[key]
        assert confusion_matrix(card) == model["confusion_matrix"]
        assert _metric(card, "gate: min_accuracy") == model["min_accuracy"]
        assert _metric(card, "infra: p50_ms") == infra[name]["measurements"]["p50_ms"]
        data = {d["name"]: d["description"] for d in card["model_parameters"]["data"]}
        assert f"{ingest['rows_read']} rows read, {ingest['rows_rejected']} rejected" in \
            data["FER-2013 source"]
        assert ingest["rows_rejected"] >= len(smoke_run.bad_lines) > 0   # the dirty rows
        assert f"{ingest['rows_written']['train']} original training faces plus " \
               f"{augment['augmented']} augmented copies" in data["train"]
        documentation = card["model_details"]["documentation"]
        assert "Evaluation gate: blessed" in documentation
        assert infra[name]["summary"] in documentation
        assert "learning_rate=" in documentation and "Found by: " in documentation
        assert smoke_run.data in documentation                  # lineage: the CSV
        considerations = json.dumps(card["considerations"])
        assert "label" in considerations and "demographics" in considerations
        assert "Out of scope" in considerations


def test_the_card_page_shows_the_card_in_a_real_browser(cards, tmp_path):
    browser.chromium_or_skip()
    card = cards["cnn"]["json"]
    with browser.open_page(cards["cnn"]["html"]) as opened:
        page = opened.page
        assert opened.remote_requests() == [] and opened.console_errors == []
        [image] = browser.image_states(page)
        assert image["complete"] and not browser.is_blank(
            browser.decode_data_uri_png(image["src"]))
        page.screenshot(path=str(tmp_path / "card.png"), full_page=True)
        numbers = browser.shown_numbers(page)
        assert len(numbers) >= 7 * 4 + 5     # per class x 4, accuracy, loss, F1, gate
        for shown in numbers:
            value = card
            for key in shown["path"].split("/"):
                value = value[int(key)] if isinstance(value, list) else value[key]
            if shown["unit"]:       # a raw measurement shown scaled (bytes as MiB)
                assert shown["text"] == (f"{float(value) / float(shown['divisor']):,.0f} "
                                         f"{shown['unit']}"), shown
                continue
            assert shown["text"] == f"{float(value):.{int(shown['digits'])}f}", shown
        assert browser.chart_data(page)["confusion"] == {"matrix": confusion_matrix(card)}
        for section in ("verdict", "intended-use", "out-of-scope", "data", "performance",
                        "provenance", "hyperparameters", "lineage", "limitations"):
            assert page.inner_text(f"#{section}").strip(), section
        assert page.inner_text("#performance").count("\n") >= len(CLASS_NAMES)
        # The server's resident memory reads in MiB; the card keeps the raw bytes.
        rss = _metric(card, "infra: server_rss_bytes")
        assert rss > 2**20 and rss == int(rss)
        [memory] = [n for n in numbers if n["unit"]]
        assert memory["text"] == f"{rss / 2**20:,.0f} MiB" and memory["visible"]
        verdict = page.inner_text("#verdict")
        assert "server memory (resident, RSS)" in verdict
        assert str(int(rss)) not in verdict and f"{int(rss):,}" not in verdict
        report = page.get_attribute("#report-link", "href")
    assert (cards["cnn"]["html"].parent / report).resolve().name == REPORT_HTML
    assert (cards["cnn"]["html"].parent / report).exists()


def test_the_push_report_links_every_card(smoke_run, cards):
    from html.parser import HTMLParser

    report = _commit_uri(smoke_run.run_root, "push") / REPORT_HTML
    links: dict[str, str] = {}

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attributes = dict(attrs)
            if tag == "a" and attributes.get("class") == "model-card":
                links[attributes["data-model"]] = attributes["href"]

    Links().feed(report.read_text())
    assert set(links) == set(cards)
    for name, href in links.items():
        assert os.path.samefile(report.parent / href, cards[name]["html"])


def test_the_card_is_inside_the_version_when_it_appears(smoke_run, tmp_path, monkeypatch):
    from fer_pipeline.components import pusher
    from fer_pipeline.core.config import PushConfig

    root = smoke_run.run_root
    seen = []
    rename = os.rename

    def checking_rename(source, target):
        if Path(target).name.isdigit():      # the version becoming visible
            seen.append(sorted(p.name for p in Path(source, CARD_DIR).iterdir()))
        rename(source, target)

    monkeypatch.setattr(pusher.os, "rename", checking_rename)
    model_dirs = {"cnn": str(_commit_uri(root, "models/cnn"))}
    arguments = (model_dirs, str(_commit_uri(root, "evaluation")),
                 str(_commit_uri(root, "infra_validation")), str(tmp_path / "serving"))
    first = pusher.run_pusher(*arguments, str(tmp_path / "push1"), PushConfig())
    assert first.models["cnn"].pushed and seen and all(
        {CARD_JSON, CARD_HTML} <= set(names) for names in seen)
    again = pusher.run_pusher(*arguments, str(tmp_path / "push2"), PushConfig())
    assert not again.models["cnn"].pushed           # the card does not make it differ
    assert again.models["cnn"].reasons[0] == "identical to served version 1"
