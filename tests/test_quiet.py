"""core/quiet.py: the known third-party noise is gone, our own lines and real errors stay."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from fer_pipeline.core import quiet

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from fer_pipeline.core import quiet
    quiet.install()                      # as every entry point does, before TensorFlow loads
    import tensorflow_data_validation as tfdv
    import tensorflow as tf
    import apache_beam.io.tfrecordio     # logs the python-snappy hint at import
    from google.api_core import _python_version_support  # noqa: F401
    path = sys.argv[1]
    with tf.io.TFRecordWriter(path) as writer:
        from tensorflow_metadata.proto.v0 import statistics_pb2
        writer.write(statistics_pb2.DatasetFeatureStatisticsList().SerializeToString())
    tfdv.load_statistics(path)           # TF logs tf_record_iterator's deprecation here
    warnings.warn("our own warning stays", UserWarning)
    tf.get_logger().error("a real TensorFlow error stays")
    logging.getLogger("apache_beam.io.tfrecordio").warning("another Beam warning stays")
    os.write(2, b"a C++-level line stays\\n")
""")


def test_a_process_that_imports_everything_prints_only_real_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "s.tfrecord")],
                            capture_output=True, text=True, env=env, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for noise in ("Unable to register", "Unable to import IPython",
                  "TFDV visualization APIs", "You are using a Python version",
                  "tf_record_iterator", "python-snappy", "oneDNN", "cuda drivers"):
        assert noise not in err, err
    for kept in ("our own warning stays", "a real TensorFlow error stays",
                 "another Beam warning stays", "a C++-level line stays"):
        assert kept in err, err


def test_filtered_stderr_drops_only_matching_lines(capfd):
    with quiet.filtered_stderr([re.compile(r"^noise \d+$")]):
        os.write(2, b"noise 1\nkeep me\nnoise 22\nnoise x\n")
    assert capfd.readouterr().err == "keep me\nnoise x\n"
