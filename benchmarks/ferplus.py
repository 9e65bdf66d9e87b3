"""FER+ majority against probability targets: the same CNN, data and seed, trained on
FER+'s majority label or on a label drawn from the votes each epoch (Barsoum et al. 2016),
and scored on the test split against FER+'s majority.

The data is synthetic (pipeline/synthetic.py) with synthetic votes
(pipeline/synthetic_ferplus.py: most of ten votes for the face's class, some for the class
it is most often confused with, a few contempt and not-a-face faces), put through the
pipeline's own steps: ingest with the votes (8 classes), augment, transform once; then per
mode and training seed the trainer (the smoke profile's CNN budget unless --epochs/--cap)
and the evaluator (accuracy against FER+'s majority, cross-entropy against the votes,
accuracy against FER-2013's label).

    .venv/bin/python benchmarks/ferplus.py [--rows 4000] [--seeds 42,43,44] [--epochs 5]
        [--cap 3000] [--work DIR]

Prints one line per training and a final JSON line (`RESULT {...}`) with medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("majority", "probability")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="synthetic CSV rows (demo: 4000)")
    parser.add_argument("--seeds", default="42,43,44", help="training seeds, comma-separated")
    parser.add_argument("--epochs", type=int, default=0, help="0: the smoke CNN's")
    parser.add_argument("--cap", type=int, default=-1,
                        help="max_train_examples (-1: the smoke CNN's, 0: all)")
    parser.add_argument("--work", default="", help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from fer_pipeline.core import quiet
    quiet.install()

    import dataclasses

    from benchmarks.machine import cpu_description
    from fer_pipeline.components.augment import run_augment
    from fer_pipeline.components.evaluator import run_evaluator
    from fer_pipeline.components.example_gen import run_example_gen
    from fer_pipeline.components.trainer import run_trainer
    from fer_pipeline.components.transform import run_transform
    from fer_pipeline.core import fileio
    from fer_pipeline.core.config import IngestConfig, load_config
    from fer_pipeline.core.contract import FERPLUS_FILE
    from fer_pipeline.pipeline.synthetic import generate_csv
    from fer_pipeline.pipeline.synthetic_ferplus import generate_ferplus_votes

    work = Path(args.work or tempfile.mkdtemp(prefix="ferplus_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    config = load_config(profile="smoke")
    cnn = config.train.models["cnn"]
    if args.epochs:
        cnn = dataclasses.replace(cnn, epochs=args.epochs)
    if args.cap >= 0:
        cnn = dataclasses.replace(cnn, max_train_examples=args.cap)
    load_before = os.getloadavg()
    started = time.time()
    csv_path, votes_path = str(work / "fer.csv"), str(work / "fer2013new.csv")
    generate_csv(csv_path, rows=args.rows, seed=0)
    vote_counts = generate_ferplus_votes(csv_path, votes_path, seed=0)
    examples, transform = str(work / "examples"), str(work / "transform")
    ingest = run_example_gen(csv_path, examples, IngestConfig(
        ferplus_labels=votes_path, ferplus_classes=8), [])
    run_augment(examples, str(work / "augmented"), config.augment, [])
    run_transform(str(work / "augmented"), examples, transform, config.transform, [])
    ferplus = fileio.read_json(fileio.join(transform, FERPLUS_FILE))

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in MODES:
            # Same transform output: only what the trainer reads as the mode changes.
            fileio.write_json(fileio.join(transform, FERPLUS_FILE), {**ferplus, "mode": mode})
            train = dataclasses.replace(config.train, seed=seed,
                                        models={**config.train.models, "cnn": cnn})
            model_dir = str(work / "models" / f"{mode}-{seed}")
            began = time.time()
            trained = run_trainer(transform, model_dir, train, "cnn")
            evaluated = run_evaluator(examples, {"cnn": model_dir}, "",
                                      str(work / "evaluation" / f"{mode}-{seed}"),
                                      config.evaluation)
            model = fileio.read_json(evaluated.evaluation_path)["models"]["cnn"]
            record = {"seed": seed, "test_accuracy_ferplus_majority":
                      round(model["ferplus"]["accuracy_majority"], 4),
                      "test_cross_entropy_votes": round(model["ferplus"]["cross_entropy"], 4),
                      "test_accuracy_fer2013_label": round(model["accuracy"], 4),
                      "epochs_run": trained.epochs_run, "seconds": round(time.time() - began, 1)}
            runs[mode].append(record)
            print(f"{mode:12s} seed {seed}: FER+ majority accuracy "
                  f"{record['test_accuracy_ferplus_majority']:.3f}, cross-entropy "
                  f"{record['test_cross_entropy_votes']:.3f}, FER-2013 accuracy "
                  f"{record['test_accuracy_fer2013_label']:.3f} ({record['seconds']:.0f} s)",
                  flush=True)
    medians = {mode: {key: statistics.median(r[key] for r in records)
                      for key in ("test_accuracy_ferplus_majority", "test_cross_entropy_votes",
                                  "test_accuracy_fer2013_label")}
               for mode, records in runs.items()}
    print("RESULT " + json.dumps({
        "cpu": cpu_description(), "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "rows": args.rows, "votes": vote_counts, "rows_written": ingest.rows_written,
        "quarantined": ingest.ferplus["quarantined"], "cnn": dataclasses.asdict(cnn),
        "medians": medians, "runs": runs, "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
