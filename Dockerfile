# The image the Kubeflow components run in (`fer-pipeline compile --kfp ... --image IMAGE`):
# Python 3.11, the exact pins of requirements.lock, and this package.
#   docker build -t REGISTRY/fer-pipeline:TAG . && docker push REGISTRY/fer-pipeline:TAG
# Not built in CI: the machines we test on have no Docker daemon (see README, On a cluster).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /opt/fer-pipeline

COPY requirements.lock pyproject.toml ./
RUN pip install --no-cache-dir -r requirements.lock

COPY core/ core/
COPY serving/ serving/
COPY components/ components/
COPY pipeline/ pipeline/
COPY schemas/ schemas/
COPY README.md ./
# A regular (not editable) install: the image holds the package as its wheel would.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && fer-pipeline dag > /dev/null
