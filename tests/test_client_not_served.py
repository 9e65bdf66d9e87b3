"""fer-client when a model is not served (the evaluation gate held it back): it says so and
decides with the models that are; only when none is served is it an error."""
from __future__ import annotations

import pytest

from fer_pipeline.serving import client_cli as fer_client
from fer_pipeline.serving.client import ModelNotServed, classify
from tests.serving_fixtures import random_images
from tests.test_client import _client, _ports, server  # noqa: F401  (module-scoped fixture)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_a_model_not_served_is_reported_and_the_others_decide(server, protocol):  # noqa: F811
    images = random_images(3, seed=21)
    client = _client(server, protocol)
    with_missing = classify(client, images, ["cnn", "resnet"], 0.05)
    cnn_alone = classify(client, images, ["cnn"], 0.05)
    for got, alone in zip(with_missing, cnn_alone):
        assert set(got["models"]) == {"cnn"}
        assert list(got["not_served"]) == ["resnet"]
        assert ("NOT_FOUND" if protocol == "grpc" else "HTTP 404") in got["not_served"]["resnet"]
        assert got["decision"] == alone["decision"]
        assert alone["not_served"] == {}
    with pytest.raises(ModelNotServed, match="none of resnet, vgg19 is served"):
        classify(client, images, ["resnet", "vgg19"], 0.05)


def test_cli_table_names_the_model_not_served(server, tmp_path, capsys):  # noqa: F811
    image = random_images(1, seed=22)[0]
    path = tmp_path / "fer.csv"
    path.write_text("emotion,pixels,Usage\n"
                    f"0,{' '.join(map(str, image.reshape(-1)))},PrivateTest\n")
    code = fer_client.main(["--csv", str(path), "--rows", "1", "--table",
                            "--models", "cnn,resnet", *_ports(server, "grpc")])
    captured = capsys.readouterr()
    assert code == 0
    assert "not served" in captured.out and "(v3)" in captured.out
    assert captured.err.strip() == "fer-client: not served: resnet; decided with cnn"
    # Nothing served at all is a server error, not a table of dashes.
    assert fer_client.main(["--csv", str(path), "--models", "resnet",
                            *_ports(server, "grpc")]) == fer_client.EXIT_SERVER_ERROR
