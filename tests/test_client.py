"""fer-client and faces.py against a real embedded server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_ES
from fer_pipeline.serving import client_cli as fer_client
from fer_pipeline.serving.client import FerClient, ServerUnavailable, classify
from fer_pipeline.serving.faces import faces_in_file, find_faces
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving.server import FerServer, ServerConfig
from fer_pipeline.core.net import free_port
from tests.serving_fixtures import push_version, random_images, save_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client_serving")
    push_version(str(root / "cnn"), 3, save_tiny_model(str(root / "t_cnn"), 0, bias_class=3))
    push_version(str(root / "vgg16"), 7, save_tiny_model(str(root / "t_vgg"), 1, bias_class=4))
    config = write_model_server_config(str(root / "models.config"), [
        ModelSpec("cnn", str(root / "cnn")), ModelSpec("vgg16", str(root / "vgg16"))])
    running = FerServer(ServerConfig(config, port=0, rest_port=0)).start()
    yield running
    running.stop()


def _client(server, protocol: str) -> FerClient:
    return FerClient("127.0.0.1", grpc_port=server.grpc_port, rest_port=server.rest_port,
                     protocol=protocol, timeout=10, retries=1)


def _ports(server, protocol: str) -> list[str]:
    port = server.grpc_port if protocol == "grpc" else server.rest_port
    return ["--protocol", protocol, "--port", str(port)]


def test_grpc_and_rest_clients_agree(server):
    images = random_images(4, seed=11)
    by_grpc = classify(_client(server, "grpc"), images, ["cnn", "vgg16"], 0.05)
    by_rest = classify(_client(server, "rest"), images, ["cnn", "vgg16"], 0.05)
    for a, b in zip(by_grpc, by_rest):
        assert a["decision"]["class_id"] == b["decision"]["class_id"]
        for model, version in (("cnn", 3), ("vgg16", 7)):
            assert a["models"][model]["version"] == b["models"][model]["version"] == version
            np.testing.assert_allclose(list(a["models"][model]["probabilities"].values()),
                                       list(b["models"][model]["probabilities"].values()),
                                       atol=1e-6)
        decision = a["decision"]
        assert CLASS_NAMES_ES[CLASS_NAMES.index(decision["class_name"])] == \
            decision["class_name_es"]


def test_cli_on_csv_rows_prints_json_and_table(server, tmp_path, capsys):
    images = random_images(3, seed=12)
    path = tmp_path / "fer.csv"
    path.write_text("emotion,pixels,Usage\n" + "".join(
        f"0,{' '.join(map(str, image.reshape(-1)))},PrivateTest\n" for image in images))
    assert fer_client.main(["--csv", str(path), "--rows", "2", *_ports(server, "grpc")]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["source"] for e in entries] == [f"{path}:2", f"{path}:3"]
    assert set(entries[0]["models"]) == {"cnn", "vgg16"}
    assert {"class_name", "class_name_es", "confidence", "needs_human_review", "reason",
            "winner"} <= set(entries[0]["decision"])

    assert fer_client.main(["--csv", str(path), "--rows", "1", "--table",
                            *_ports(server, "rest")]) == 0
    table = capsys.readouterr().out
    assert "decision" in table and "(v3)" in table and "(v7)" in table


def _face_photo(path: str) -> None:
    """A 480x400 'photo': one of the project's synthetic faces, enlarged and padded.

    Hand-drawn cartoons rarely trigger a Haar cascade; these procedural faces do (checked:
    all seven expressions are detected at this size).
    """
    from fer_pipeline.pipeline.synthetic import draw_faces
    face = draw_faces(np.array([3]), np.random.default_rng(0))[0]
    big = cv2.resize(face, (240, 240), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(path, cv2.copyMakeBorder(big, 80, 80, 120, 120, cv2.BORDER_CONSTANT,
                                         value=int(face[0, 0])))


def test_faces_found_in_a_photo_and_not_in_a_blank_image(tmp_path):
    photo, blank = str(tmp_path / "photo.png"), str(tmp_path / "blank.jpg")
    _face_photo(photo)
    cv2.imwrite(blank, np.full((300, 400), 128, np.uint8))
    faces = faces_in_file(photo)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    assert 100 <= x <= 200 and 50 <= y <= 150 and 150 <= w <= 260  # around the drawn face
    assert faces[0].pixels.shape == (48, 48) and faces[0].pixels.dtype == np.uint8
    assert faces_in_file(blank) == []
    assert find_faces(np.zeros((100, 100), np.uint8)) == []
    with pytest.raises(ValueError, match="not a readable image"):
        faces_in_file(str(tmp_path / "missing.png"))


def test_cli_on_images_reports_faces_and_no_face(server, tmp_path, capsys):
    photo, blank = str(tmp_path / "photo.png"), str(tmp_path / "blank.png")
    _face_photo(photo)
    cv2.imwrite(blank, np.full((300, 400), 128, np.uint8))
    assert fer_client.main(["--image", photo, "--image", blank,
                            *_ports(server, "grpc")]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries[0]["source"].startswith(photo + "#face0")
    assert "decision" in entries[0]
    assert entries[1] == {"source": blank, "note": "no face found"}


def test_retries_with_backoff_then_one_clear_line(capsys):
    port = free_port()  # nothing listens there
    client = FerClient("127.0.0.1", rest_port=port, protocol="rest", timeout=1, retries=2,
                       backoff_s=0.1)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="after 3 attempt"):
        client.predict("cnn", np.zeros((1, 48, 48), np.uint8))
    assert time.monotonic() - started >= 0.1 + 0.2  # waited 0.1 s, then 0.2 s

    grpc_client = FerClient("127.0.0.1", grpc_port=port, protocol="grpc", timeout=1,
                            retries=1, backoff_s=0.05)
    with pytest.raises(ServerUnavailable, match="grpc server at"):
        grpc_client.predict("cnn", np.zeros((1, 48, 48), np.uint8))


def test_cli_exits_nonzero_without_traceback_when_server_is_down(tmp_path):
    np.save(tmp_path / "faces.npy", random_images(2))
    result = subprocess.run(
        [sys.executable, "-m", "fer_pipeline.serving.client_cli", "--npy", str(tmp_path / "faces.npy"),
         "--protocol", "rest", "--port", str(free_port()), "--retries", "1",
         "--backoff", "0.05"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == fer_client.EXIT_UNAVAILABLE
    assert "Traceback" not in result.stderr
    assert "server unavailable" in result.stderr and "not reachable" in result.stderr
    assert result.stdout == ""


def test_unknown_model_is_a_clear_server_error(server, capsys):
    images = random_images(1)
    with pytest.raises(fer_client.ServerError, match="NOT_FOUND"):
        _client(server, "grpc").predict("resnet", images)
    with pytest.raises(fer_client.ServerError, match="HTTP 404"):
        _client(server, "rest").predict("resnet", images)


def test_csv_rows_can_be_limited_to_one_usage_and_carry_their_true_label(tmp_path):
    images = random_images(4, seed=3)
    lines = ["emotion,pixels,Usage"] + [
        f"{label},{' '.join(map(str, image.ravel()))},{usage}"
        for label, image, usage in zip([3, 4, 5, 6], images,
                                       ["Training", "PrivateTest", "Training", "PrivateTest"])]
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(lines) + "\n")
    picked = fer_client.images_from_csv(str(path), rows=5, usage="PrivateTest")
    assert [item.source.rsplit(":", 1)[1] for item in picked] == ["3", "5"]
    assert [item.true_label for item in picked] == [4, 6]
    np.testing.assert_array_equal(picked[0].pixels, images[1])
    entries = fer_client.report(picked[:1], [{"decision": {}}])
    assert entries[0]["true_class"] == "sad"
