"""The bulk inferrer's bookkeeping: Beam metrics counted in the workers, read from the
finished job by the driver, and checked against each other before anything is committed.

Every stage that hands records on counts them (namespace `fer.bulk_inference`):

- `inputs_read`: CSV rows (non-blank lines) parsed, or image files matched;
- `inputs_with_faces`: rows that parsed, files that gave at least one face;
- `faces_found`: faces sent to the models (one per good row; one per face in a photo);
- `rejected` (and `rejected.<reason code>`): records handed to the rejected sink;
- `scored.<model>`: PredictionLogs handed to the model's sink;
- `faces_scored`, `needs_review`, `decision.<class>`: predictions handed to their sink.

The pipeline has no stage that may drop a record (each row or file is scored or rejected,
each face is answered by every model), so the counts must balance: inputs read = inputs
with faces + rejected; for every model, answers = faces found; predictions = faces found.
A mismatch is a lost record, and `check_counts` fails the job before the commit. The
driver reads these few numbers, never the records themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from apache_beam.metrics.metric import Metrics, MetricsFilter

from fer_pipeline.core.errors import RecordsLost

__all__ = ["NAMESPACE", "JobCounts", "check_counts", "count", "job_counts"]

NAMESPACE = "fer.bulk_inference"
INPUTS_READ = "inputs_read"
INPUTS_WITH_FACES = "inputs_with_faces"
FACES_FOUND = "faces_found"
REJECTED = "rejected"
FACES_SCORED = "faces_scored"
NEEDS_REVIEW = "needs_review"
# Prefixes of the counters named per value: `scored.cnn`, `decision.happy`, ...
SCORED = "scored."
DECISION = "decision."
REJECTED_BY = "rejected."


def count(name: str, value: int = 1) -> None:
    """Adds `value` to the job's counter `name` (in a Beam worker)."""
    Metrics.counter(NAMESPACE, name).inc(value)


@dataclass
class JobCounts:
    """The job's counters, as the driver read them from the finished job."""
    inputs_read: int = 0
    inputs_with_faces: int = 0
    faces_found: int = 0
    rejected: int = 0
    faces_scored: int = 0
    needs_review: int = 0
    scored: dict[str, int] = field(default_factory=dict)         # model -> answers
    decisions: dict[str, int] = field(default_factory=dict)      # class name -> faces
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


def job_counts(result: Any) -> JobCounts:
    """The counters of a finished Beam job (its PipelineResult): the committed values
    (successful bundles only, so a retried bundle is not counted twice), or the attempted
    ones where a runner reports no committed values."""
    totals: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + int(value or 0)   # one result per Beam step
    found = JobCounts()
    for name, value in sorted(totals.items()):
        if name.startswith(SCORED):
            found.scored[name[len(SCORED):]] = value
        elif name.startswith(DECISION):
            found.decisions[name[len(DECISION):]] = value
        elif name.startswith(REJECTED_BY):
            found.rejected_by_reason[name[len(REJECTED_BY):]] = value
        elif hasattr(found, name):
            setattr(found, name, value)
    return found


def check_counts(counts: JobCounts, models: Sequence[str], what: str) -> None:
    """RecordsLost (one line) unless every record read was scored or rejected; `what` is
    "rows" or "files", what `inputs_read` counts."""
    problems = []
    if counts.inputs_read != counts.inputs_with_faces + counts.rejected:
        problems.append(f"{counts.inputs_read} {what} read, but {counts.inputs_with_faces} "
                        f"gave faces and {counts.rejected} were rejected")
    for model in models:
        if counts.scored.get(model, 0) != counts.faces_found:
            problems.append(f"{counts.faces_found} faces found, but {model} answered "
                            f"{counts.scored.get(model, 0)}")
    if counts.faces_scored != counts.faces_found:
        problems.append(f"{counts.faces_found} faces found, but {counts.faces_scored} "
                        "predictions were written")
    if problems:
        raise RecordsLost("bulk inference lost records (" + "; ".join(problems) +
                          "); nothing was committed, the previous outputs stay in force")
