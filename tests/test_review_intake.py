"""fer-client --review-queue / --explain against a real embedded server: flagged faces are
queued once with both models' probabilities, versions and saliency; overlays are PNGs."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from fer_pipeline.core.contract import IMAGE_SIZE, NUM_CLASSES
from fer_pipeline.serving import client_cli as fer_client
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving.review_queue import STATUS_PENDING, ReviewQueue
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.review_fixtures import save_explain_model
from tests.serving_fixtures import push_version, random_images, save_tiny_model


def _serve(root, models: dict) -> FerServer:
    specs = []
    for name, (version, template) in models.items():
        push_version(str(root / name), version, template)
        specs.append(ModelSpec(name, str(root / name)))
    config = write_model_server_config(str(root / "models.config"), specs)
    return FerServer(ServerConfig(config, port=0, rest_port=0)).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_serving")
    running = _serve(root, {
        "cnn": (3, save_explain_model(str(root / "t_cnn"), 0, bias_class=3)),
        "vgg16": (7, save_explain_model(str(root / "t_vgg"), 1, bias_class=3)),
        "old": (1, save_tiny_model(str(root / "t_old"), 2, bias_class=5))})
    yield running
    running.stop()


@pytest.fixture
def faces_npy(tmp_path) -> str:
    """Four noise images, on which the two tiny models disagree, and three near-black ones,
    on which only their shared bias (class 3) speaks, so they agree."""
    path = str(tmp_path / "faces.npy")
    dark = np.stack([np.full((IMAGE_SIZE, IMAGE_SIZE), value, np.uint8) for value in (0, 1, 2)])
    np.save(path, np.concatenate([random_images(4, seed=21), dark]))
    return path


def _run(server, faces_npy: str, *extra: str, models: str = "cnn,vgg16") -> None:
    # Tolerance 1.0: every disagreement between the two models goes to review.
    code = fer_client.main(["--npy", faces_npy, "--port", str(server.grpc_port),
                            "--models", models, "--tolerance", "1.0", "--retries", "0",
                            *extra])
    assert code == 0


def test_flagged_faces_are_queued_once_with_saliency(server, faces_npy, tmp_path, capsys):
    queue_dir = str(tmp_path / "queue")
    _run(server, faces_npy, "--review-queue", queue_dir)
    captured = capsys.readouterr()
    entries = json.loads(captured.out)
    flagged = [i for i, e in enumerate(entries) if e["decision"]["needs_human_review"]]
    # The fixture's models disagree on some faces and agree on others: both paths run.
    assert 0 < len(flagged) < len(entries)
    assert f"{len(flagged)} face(s) need human review: {len(flagged)} queued" in captured.err

    images = np.load(faces_npy)
    with ReviewQueue(queue_dir) as queue:
        assert queue.counts()[STATUS_PENDING] == len(flagged)
        for item_id, index in enumerate(flagged, start=1):
            item = queue.get(item_id)
            np.testing.assert_array_equal(item.pixels, images[index])
            assert item.source == f"{faces_npy}[{index}]"
            assert item.decision == entries[index]["decision"]
            assert {m: p.version for m, p in item.models.items()} == {"cnn": 3, "vgg16": 7}
            for model, stored in item.models.items():
                sent = entries[index]["models"][model]["probabilities"]
                np.testing.assert_allclose(stored.probabilities, list(sent.values()), atol=1e-6)
                assert stored.saliency.shape == (NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE)
                assert stored.saliency.max() == pytest.approx(1.0)

    # The same faces again: nothing new, nothing duplicated.
    _run(server, faces_npy, "--review-queue", queue_dir)
    assert f"0 queued in {queue_dir}, {len(flagged)} already there" in capsys.readouterr().err
    with ReviewQueue(queue_dir) as queue:
        assert sum(queue.counts().values()) == len(flagged)


def test_the_queue_directory_can_come_from_the_environment(server, faces_npy, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.setenv(fer_client.REVIEW_QUEUE_ENV, str(tmp_path / "env_queue"))
    _run(server, faces_npy)
    assert "queued in " + str(tmp_path / "env_queue") in capsys.readouterr().err
    assert os.path.exists(tmp_path / "env_queue" / "review_queue.sqlite3")


def test_a_model_without_explain_is_queued_without_maps(server, faces_npy, tmp_path, capsys):
    queue_dir = str(tmp_path / "queue")
    _run(server, faces_npy, "--review-queue", queue_dir, models="cnn,old")
    err = capsys.readouterr().err
    assert "old: no saliency" in err and "explain" in err
    with ReviewQueue(queue_dir) as queue:
        item = queue.next_pending()
        assert item.models["old"].saliency is None
        assert item.models["cnn"].saliency is not None


def test_explain_writes_one_overlay_per_face_and_model(server, faces_npy, tmp_path, capsys):
    out = tmp_path / "overlays"
    _run(server, faces_npy, "--explain", str(out), "--protocol", "grpc")
    entries = json.loads(capsys.readouterr().out)
    names = sorted(os.listdir(out))
    assert len(names) == 2 * len(entries)
    for index, entry in enumerate(entries):
        for model in ("cnn", "vgg16"):
            name = f"face{index:03d}_{model}_{entry['models'][model]['class_name']}.png"
            image = cv2.imread(str(out / name))
            assert image.shape == (IMAGE_SIZE * 6, IMAGE_SIZE * 6, 3)
            colour = np.abs(image[..., 0].astype(int) - image[..., 2]).max()
            if index == 4:
                # The black face is the integration baseline itself: nothing to attribute,
                # so its overlay is the plain grey face.
                assert colour == 0
            elif index < 4:
                # A noise face's overlay carries the heat colours somewhere.
                assert colour > 50
