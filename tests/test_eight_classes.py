"""FER+'s eight classes (with contempt) downstream of a trained model: the export's
signatures, fer-serve over gRPC and REST, the client's ensemble and its refusal of a 7- and
an 8-class model together, a tie going to the review queue and page, and an answer
`contempt` coming back as training data (a FER+ vote file). The models are tiny untrained
Keras models put through the project's own export; nothing here trains."""
from __future__ import annotations

import csv
import sqlite3

import keras
import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components.model_importer import ScaledPixels
from fer_pipeline.core.contract import (CLASS_NAMES, CLASS_NAMES_FERPLUS, CLASS_NAMES_FERPLUS_ES,
                                        FERPLUS_COLUMNS, NUM_PIXELS, REVIEW_QUEUE_FILE)
from fer_pipeline.core.ensemble import ClassSetMismatch
from fer_pipeline.core.serving_export import export_serving_model
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving import review_app
from fer_pipeline.serving.client import FerClient, classify
from fer_pipeline.serving.review_intake import queue_flagged
from fer_pipeline.serving.review_queue import STATUS_LABELED, ModelPrediction, ReviewQueue
from fer_pipeline.serving.review_render import item_json
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.serving_fixtures import push_version, random_images

TOLERANCE = 0.05
CONTEMPT = CLASS_NAMES_FERPLUS.index("contempt")
NEUTRAL = CLASS_NAMES.index("neutral")


def constant_model(probabilities: dict[int, float], width: int, seed: int) -> keras.Model:
    """A Dense softmax whose answer hardly depends on the face: `probabilities` (class ->
    probability, the rest shared evenly) from its bias, tiny random weights on the pixels."""
    rest = (1.0 - sum(probabilities.values())) / (width - len(probabilities))
    target = np.full(width, rest)
    for class_id, probability in probabilities.items():
        target[class_id] = probability
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((NUM_PIXELS,)),
                              keras.layers.Dense(width, activation="softmax")])
    kernel = np.random.default_rng(seed).normal(0, 1e-5, (NUM_PIXELS, width))
    model.layers[-1].set_weights([kernel.astype(np.float32), np.log(target).astype(np.float32)])
    return model


def export(model: keras.Model, directory: str) -> str:
    """The project's export (core/serving_export.py) with the importer's 1/255 scaling in
    place of a Transform graph, so no Transform step has to run."""
    export_serving_model(model, f"{directory}-no-transform", directory,
                         preprocessing=ScaledPixels(1 / 255))
    return directory


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """fer-serve on loopback with two 8-class models that narrowly disagree (cnn: contempt
    0.52, vgg16: neutral 0.55, a tie within 0.05) and a 7-class model `seven`."""
    root = tmp_path_factory.mktemp("eight")
    exports = {
        "cnn": export(constant_model({CONTEMPT: 0.52}, 8, 1), str(root / "cnn_export")),
        "vgg16": export(constant_model({NEUTRAL: 0.55}, 8, 2), str(root / "vgg_export")),
        "seven": export(constant_model({NEUTRAL: 0.6}, 7, 3), str(root / "seven_export")),
    }
    for name, path in exports.items():
        push_version(str(root / "models" / name), 1, path)
    config = write_model_server_config(str(root / "models.config"), [
        ModelSpec(name, str(root / "models" / name)) for name in exports])
    server = FerServer(ServerConfig(config, port=0, rest_port=0)).start()
    yield server, exports
    server.stop()


def client(server: FerServer, protocol: str) -> FerClient:
    return FerClient(grpc_port=server.grpc_port, rest_port=server.rest_port,
                     protocol=protocol, retries=0, timeout=60)


def test_the_export_names_eight_classes_from_the_models_width(served):
    _, exports = served
    loaded = tf.saved_model.load(exports["cnn"])
    faces = tf.constant(random_images(2), tf.uint8)
    answer = loaded.signatures["serving_uint8"](pixels=faces)
    assert answer["probabilities"].shape == (2, 8)
    assert [n.decode() for n in answer["class_name"].numpy()] == ["contempt", "contempt"]
    explained = loaded.signatures["explain"](pixels=faces[:1])
    assert explained["saliency"].shape == (1, 8, 48, 48)
    seven = tf.saved_model.load(exports["seven"]).signatures["serving_uint8"](pixels=faces)
    assert seven["probabilities"].shape == (2, 7)
    assert {n.decode() for n in seven["class_name"].numpy()} == {"neutral"}


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_the_client_combines_two_eight_class_models_with_fer_plus_names(served, protocol):
    server, _ = served
    results = classify(client(server, protocol), random_images(3), ("cnn", "vgg16"), TOLERANCE)
    for result in results:
        cnn, vgg = result["models"]["cnn"], result["models"]["vgg16"]
        assert list(cnn["probabilities"]) == list(CLASS_NAMES_FERPLUS)
        assert cnn["probabilities"]["contempt"] == pytest.approx(0.52, abs=1e-3)
        assert (cnn["class_name"], vgg["class_name"]) == ("contempt", "neutral")
        decision = result["decision"]
        assert (decision["class_name"], decision["winner"]) == ("neutral", "vgg16")
        assert decision["needs_human_review"] and "cnn: contempt 0.520" in decision["reason"]


def test_rest_and_grpc_classify_answer_contempt_by_name(served):
    server, _ = served
    rest = client(server, "rest")
    payload, _ = rest._rest_call("/v1/models/cnn:predict", {
        "signature_name": "serving_default", "instances": random_images(1).tolist()})
    assert payload["predictions"][0]["class_name"] == "contempt"
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc
    from tests.serving_fixtures import example_bytes
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "cnn"
    request.input.example_list.examples.add().ParseFromString(example_bytes(random_images(1)[0]))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(
            request, timeout=60)
    classes = reply.result.classifications[0].classes
    assert [c.label for c in classes] == list(CLASS_NAMES_FERPLUS)
    assert max(classes, key=lambda c: c.score).label == "contempt"


def test_a_seven_and_an_eight_class_model_are_refused_in_one_line(served, capsys, tmp_path):
    server, _ = served
    with pytest.raises(ClassSetMismatch, match="cnn has 8, seven has 7 classes"):
        classify(client(server, "grpc"), random_images(1), ("cnn", "seven"), TOLERANCE)
    from fer_pipeline.serving.client_cli import EXIT_SERVER_ERROR, main
    faces = random_images(1)
    npy = str(tmp_path / "faces.npy")
    np.save(npy, faces)
    status = main(["--npy", npy, "--port", str(server.grpc_port), "--models", "cnn,seven",
                   "--tolerance", "0.05", "--retries", "0"])
    error = capsys.readouterr().err.strip()
    assert status == EXIT_SERVER_ERROR
    assert error.count("\n") == 0 and "different class sets" in error, error


def test_a_tie_goes_to_review_and_contempt_comes_back_as_fer_plus_votes(served, tmp_path):
    server, _ = served
    fer = client(server, "grpc")
    faces = random_images(2, seed=7)
    results = classify(fer, faces, ("cnn", "vgg16"), TOLERANCE)
    queue_dir = str(tmp_path / "queue")
    with ReviewQueue(queue_dir) as queue:
        summary = queue_flagged(fer, queue, faces, ["a.png", "b.png"], results, ("cnn", "vgg16"))
        assert (summary.flagged, summary.queued) == (2, 2)
        item = queue.next_pending()
        assert item.num_classes == 8
        assert item.models["cnn"].saliency.shape == (8, 48, 48)
        shown = item_json(item)
        assert [c["en"] for c in shown["classes"]] == list(CLASS_NAMES_FERPLUS)
        assert shown["classes"][CONTEMPT]["es"] == CLASS_NAMES_FERPLUS_ES[CONTEMPT] == "Desprecio"
        assert shown["models"][0]["top3"][0]["en"] == "contempt"
        queue.decide(item.id, "label", CONTEMPT)
        queue.decide(item.id + 1, "label", CLASS_NAMES.index("happy"))
        assert queue.get(item.id).status == STATUS_LABELED

    out, votes = tmp_path / "reviewed.csv", tmp_path / "votes.csv"
    # FER-2013's CSV alone cannot say contempt: the export says so instead of guessing.
    assert review_app.main(["export", "--queue", queue_dir, "--out", str(out)]) == 2
    assert not out.exists()
    assert review_app.main(["export", "--queue", queue_dir, "--out", str(out),
                            "--ferplus-votes", str(votes)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(votes, newline="") as handle:
        vote_rows = list(csv.DictReader(handle))
    assert [int(r["emotion"]) for r in rows] == [NEUTRAL, CLASS_NAMES.index("happy")]
    assert [r["Usage"] for r in vote_rows] == [r["Usage"] for r in rows] == ["Training"] * 2
    assert [{c: int(r[c]) for c in FERPLUS_COLUMNS if int(r[c])} for r in vote_rows] == [
        {"contempt": 10}, {"happiness": 10}]
    np.testing.assert_array_equal(
        np.array(rows[0]["pixels"].split(), np.uint8).reshape(48, 48), faces[0])


def test_ingest_reads_the_exported_votes_as_a_contempt_majority(tmp_path):
    """The vote file is what ingest's FER+ reader (core/ferplus_votes.py) takes."""
    ferplus_votes = pytest.importorskip("fer_pipeline.core.ferplus_votes")
    queue_dir = str(tmp_path / "queue")
    with ReviewQueue(queue_dir) as queue:
        probabilities = np.full(8, 0.3 / 7)
        probabilities[CONTEMPT] = 0.7
        record = queue.record(random_images(1)[0], "x", {"cnn": ModelPrediction(1, probabilities)},
                              {"needs_human_review": True})
        queue.decide(record.item_id, "label", CONTEMPT)
        queue.export_csv(str(tmp_path / "reviewed.csv"), str(tmp_path / "votes.csv"))
    verdicts = ferplus_votes.read_votes(str(tmp_path / "votes.csv"),
                                        str(tmp_path / "reviewed.csv"), 2, 8)
    (votes, majority, clear), = verdicts.values()
    assert (CLASS_NAMES_FERPLUS[majority], clear) == ("contempt", True)
    # With seven classes contempt's votes are dropped: the face is not trained on.
    (dropped,) = ferplus_votes.read_votes(str(tmp_path / "votes.csv"),
                                          str(tmp_path / "reviewed.csv"), 2, 7).values()
    assert isinstance(dropped, str) and "no vote" in dropped


def test_the_queue_checks_labels_against_each_faces_own_classes(tmp_path):
    with ReviewQueue(str(tmp_path)) as queue:
        seven = queue.record(random_images(1, seed=1)[0], "7", {
            "cnn": ModelPrediction(1, np.ones(7) / 7)}, {"needs_human_review": True})
        eight = queue.record(random_images(1, seed=2)[0], "8", {
            "cnn": ModelPrediction(1, np.ones(8) / 8)}, {"needs_human_review": True})
        from fer_pipeline.serving.review_queue import ReviewError
        with pytest.raises(ReviewError, match="0-6"):
            queue.decide(seven.item_id, "label", CONTEMPT)
        with pytest.raises(ReviewError, match="0-7"):
            queue.decide(eight.item_id, "label", 8)
        assert queue.decide(eight.item_id, "label", CONTEMPT).label == CONTEMPT
        with pytest.raises(ValueError, match="different class sets"):
            queue.record(random_images(1, seed=3)[0], "mixed", {
                "cnn": ModelPrediction(1, np.ones(8) / 8),
                "vgg16": ModelPrediction(1, np.ones(7) / 7)}, {"needs_human_review": True})


def test_a_version_one_queue_is_widened_to_take_contempt(tmp_path):
    """Queues written before FER+ allowed labels 0-6 in a CHECK: opening one rebuilds it,
    keeping its faces, predictions and decisions."""
    with ReviewQueue(str(tmp_path)) as queue:
        first = queue.record(random_images(1, seed=4)[0], "old", {
            "cnn": ModelPrediction(1, np.ones(8) / 8)}, {"needs_human_review": True})
    path = str(tmp_path / REVIEW_QUEUE_FILE)
    with sqlite3.connect(path) as db:       # turn it back into what version 1 wrote
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'items'").fetchone()[0]
        db.execute("PRAGMA legacy_alter_table=ON")   # the other tables keep naming `items`
        db.execute("ALTER TABLE items RENAME TO items_new")
        db.execute(sql.replace("BETWEEN 0 AND 7", "BETWEEN 0 AND 6"))
        db.execute("INSERT INTO items SELECT * FROM items_new")
        db.execute("DROP TABLE items_new")
        db.execute("PRAGMA user_version=1")
    with sqlite3.connect(path) as db:
        assert "BETWEEN 0 AND 6" in db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'items'").fetchone()[0]
    with ReviewQueue(str(tmp_path)) as queue:
        assert queue.get(first.item_id).models["cnn"].probabilities.shape == (8,)
        assert queue.decide(first.item_id, "label", CONTEMPT).label == CONTEMPT
        assert queue._db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert queue._db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert queue._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_the_infra_validators_contract_follows_the_models_width():
    from fer_pipeline.serving.warmup import contract_outputs
    assert contract_outputs("explain", 8)["saliency"].inner_shape == (8, 48, 48)
    assert contract_outputs("serving_uint8")["probabilities"].inner_shape == (7,)


# --- the review page in a real browser ----------------------------------------------------

def test_the_review_page_shows_the_faces_own_classes_in_chromium(tmp_path):
    from tests.browser import CHROMIUM, CHROMIUM_ARGS, chromium_or_skip
    from tests.test_review_app import Running, _wait_item
    chromium_or_skip()
    from playwright.sync_api import sync_playwright
    queue = ReviewQueue(str(tmp_path / "queue"))
    for seed, width in ((1, 8), (2, 7)):     # a FER+ face first, then a FER-2013 one
        probabilities = np.full(width, 0.1 / (width - 1))
        probabilities[width - 1] = 0.9
        queue.record(random_images(1, seed=seed)[0], f"face{seed}", {
            "cnn": ModelPrediction(1, probabilities, np.zeros((width, 48, 48)))},
            {"needs_human_review": True, "reason": "tie"})
    running = Running(queue)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(running.base + "/")
            _wait_item(page, 1)
            buttons = page.locator("#classes button")
            assert buttons.count() == 8
            assert "contempt" in buttons.nth(7).inner_text()
            assert "Desprecio" in buttons.nth(7).inner_text()
            page.keyboard.press("7")                      # contempt, by key
            _wait_item(page, 2)
            assert page.locator("#classes button").count() == 7
            page.keyboard.press("7")                      # no class 7 here: nothing happens
            page.keyboard.press("6")                      # neutral
            page.wait_for_selector("#done:not([hidden])", timeout=10_000)
            browser.close()
        assert errors == []
        assert [(item_id, label) for item_id, label in running.queue._db.execute(
            "SELECT id, label FROM items ORDER BY id")] == [(1, CONTEMPT), (2, NEUTRAL)]
    finally:
        running.stop()



# --- the monitor ------------------------------------------------------------------------

def test_the_monitor_reads_eight_class_answers(served, tmp_path):
    """fer-serve's logs of two FER+ models through the monitor's Beam job: their answers,
    class mix (with contempt), ties, and the page's table of classes."""
    from fer_pipeline.components.monitor.answers import (answers_from_probabilities,
                                                         summary_from_counts, summary_numbers)
    from fer_pipeline.components.monitor.executor import collect_traffic
    from fer_pipeline.components.monitor.page import answers_section
    from fer_pipeline.core.config import MonitorConfig
    from tests.monitor_fixtures import log_predictions
    _, exports = served
    faces = random_images(16, seed=11)
    log = str(tmp_path / "logs" / "requests.tfrecord")
    log_predictions(log, faces, {"cnn": (1, exports["cnn"]), "vgg16": (1, exports["vgg16"])})
    traffic = collect_traffic([log], str(tmp_path / "job"), MonitorConfig())
    assert traffic.reasons("bad") == {}
    assert traffic.served() == {("cnn", 1): 16, ("vgg16", 1): 16}
    served_mix = summary_from_counts(traffic.counts, "", {"cnn": 1, "vgg16": 1},
                                     "cnn=1,vgg16=1", 1e-6)
    assert list(served_mix["class_mix"]["cnn"]) == list(CLASS_NAMES_FERPLUS)
    assert served_mix["class_mix"]["cnn"]["contempt"] == 1.0
    assert served_mix["class_mix"]["vgg16"]["neutral"] == 1.0
    assert served_mix["review_rate"] == 1.0          # every face a tie within 0.05
    # The test split's side, from 8-wide probabilities, and the page over both.
    test = {"cnn": np.tile(np.eye(8, dtype=np.float32)[CONTEMPT], (4, 1)),
            "vgg16": np.tile(np.eye(8, dtype=np.float32)[NEUTRAL], (4, 1))}
    expected = summary_numbers(answers_from_probabilities(test, TOLERANCE))
    assert expected["class_mix"]["cnn"]["contempt"] == 1.0
    page = answers_section({"traffic": served_mix, "expected": expected, "tie_tolerance": TOLERANCE})
    assert "contempt / Desprecio" in page and 'data-path="traffic/class_mix/cnn/contempt"' in page


# --- the evaluation report and the model card ---------------------------------------------

def test_the_report_and_the_model_card_show_eight_classes():
    from fer_pipeline.core.model_card import CardFacts, build_card
    from fer_pipeline.core.model_card_page import card_classes, confusion_matrix, render_card
    from fer_pipeline.core.report_page import data_section, mistakes_gallery, per_class_table
    matrix = np.arange(64).reshape(8, 8)
    per_class = [{"class_id": k, "class_name": name, "class_name_es": es, "precision": 0.5,
                  "recall": 0.25, "f1": 0.3, "support": int(matrix[k].sum())}
                 for k, (name, es) in enumerate(zip(CLASS_NAMES_FERPLUS, CLASS_NAMES_FERPLUS_ES))]
    model = {"accuracy": 0.5, "loss": 1.0, "macro_avg": {"precision": 0.5, "recall": 0.25,
                                                         "f1": 0.3},
             "per_class": per_class, "confusion_matrix": matrix.tolist()}
    card = build_card(CardFacts("cnn", 1, "/served/cnn/1", "2026-12-06", model, {},
                                {"test_examples": int(matrix.sum()),
                                 "majority_baseline": {"accuracy": 0.2}},
                                {"blessed": True, "reasons": []}))
    assert "8 FER+ expressions" in card["model_details"]["overview"]
    assert "[batch, 8]" in card["model_parameters"]["output_format"]
    assert card_classes(card) == list(CLASS_NAMES_FERPLUS)
    assert confusion_matrix(card) == matrix.tolist()
    assert "contempt" in render_card(card)
    table = per_class_table("cnn", model)
    assert "Desprecio" in table and 'data-path="models/cnn/per_class/7/recall"' in table
    distribution = dict(zip(CLASS_NAMES_FERPLUS, range(1, 9)))
    page = data_section({"data": {"class_distribution": distribution, "test_examples": 36,
                                  "split": "test", "majority_baseline": {
                                      "class_name": "happy", "accuracy": 4 / 36}}})
    assert '"contempt"' in page and "[1, 2, 3, 4, 5, 6, 7, 8]" in page   # the chart's data
    gallery = mistakes_gallery("cnn", {name: [] for name in CLASS_NAMES_FERPLUS}, {})
    assert "contempt / Desprecio" in gallery


def test_bulk_inference_names_an_eight_class_answer():
    from fer_pipeline.components.bulk_inferrer.outputs import prediction_line
    from fer_pipeline.core.ensemble import combine
    probabilities = [0.3 / 7] * 7 + [0.7]
    decision = combine({"cnn": probabilities}, TOLERANCE)
    line = prediction_line({"source": "faces.csv", "row": 2, "face": None, "box": None,
                            "label": 3, "usage": "PrivateTest",
                            "models": {"cnn": {"version": 1, "probabilities": probabilities}},
                            "decision": {**decision.__dict__}}, ["cnn"])
    cells = next(csv.reader([line]))
    assert cells[4] == "happy"                         # the CSV's own FER-2013 label
    assert cells[6:9] == ["contempt", "0.700000", "1"]
    assert cells[9] == "contempt"


def test_bulk_inference_refuses_a_seven_and_an_eight_class_model_before_its_job(served,
                                                                                 tmp_path):
    from fer_pipeline.components.bulk_inferrer.executor import _class_count, run_bulk_inferrer
    from fer_pipeline.components.bulk_inferrer.records import ModelVersion
    from fer_pipeline.core.config import InferenceConfig
    _, exports = served
    assert (_class_count(exports["cnn"]), _class_count(exports["seven"])) == (8, 7)
    data = tmp_path / "faces.csv"
    data.write_text("emotion,pixels,Usage\n3," + " ".join(["128"] * NUM_PIXELS) + ",Training\n")
    models = [ModelVersion("cnn", 1, exports["cnn"]), ModelVersion("seven", 1, exports["seven"])]
    with pytest.raises(ClassSetMismatch, match="cnn has 8, seven has 7 classes"):
        run_bulk_inferrer(str(data), models, str(tmp_path / "scores"), None,
                          InferenceConfig(tie_tolerance=TOLERANCE), [])
    assert not (tmp_path / "scores").exists()
