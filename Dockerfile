# The image `showtell export-pipeline kfp` runs every step in (kfp.image), and a way to run
# `showtell` anywhere: the package with the gs:// and s3:// file systems and the Kubeflow SDK,
# plus Java for the COCO caption metrics (pycocoevalcap's tokenizer and METEOR).
#
#   docker build -t showtell:latest .                                  # CPU
#   docker build -t showtell:gpu --build-arg TENSORFLOW=tensorflow[and-cuda] .   # CUDA for training steps
#   docker run --rm showtell:latest showtell run --config gs://bucket/configs/nightly.yaml
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

# `tensorflow` (CPU) or `tensorflow[and-cuda]` (the CUDA libraries as pip packages).
ARG TENSORFLOW=tensorflow
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/showtell
COPY setup.py README.md ./
COPY schemas ./schemas
COPY pipelines ./pipelines
COPY trainer ./trainer
COPY inference ./inference
COPY orchestration ./orchestration
COPY configs ./configs
RUN pip install --no-cache-dir "${TENSORFLOW}" ".[gcs,s3,kfp]" \
    && showtell --help > /dev/null

# Steps run as `showtell run --config <url> --until <step>`: no entrypoint, the command is given.
CMD ["showtell", "--help"]
