# Training image for Cloud TPU VMs (default) or NVIDIA GPUs.
#   docker build -t hlm1b .                                       # TPU, embedded/tarball/text data
#   docker build -t hlm1b --build-arg WITH_TFDS=1 .               # TPU + the TFDS lm1b source
#   docker build -t hlm1b --build-arg WITH_GCS=1 .                # TPU + gs:// workdirs
#   docker build -t hlm1b-gpu --build-arg ACCELERATOR=cuda12 .    # NVIDIA GPU
# On a TPU VM run with --privileged --net=host so JAX sees the chips and the other hosts.
FROM python:3.11-slim

ARG ACCELERATOR=tpu
ARG WITH_TFDS=0
ARG WITH_GCS=0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HLM1B_DATA_ROOT=/data

WORKDIR /app
COPY requirements.txt requirements-tpu.txt requirements-tfds.txt requirements-gcs.txt pyproject.toml ./
RUN python -m pip install --upgrade pip \
 && if [ "${ACCELERATOR}" = "tpu" ]; then pip install -r requirements.txt -r requirements-tpu.txt; \
    else pip install -r requirements.txt "jax[${ACCELERATOR}]==0.10.2"; fi \
 && if [ "${WITH_TFDS}" = "1" ]; then pip install -r requirements-tfds.txt; fi \
 && if [ "${WITH_GCS}" = "1" ]; then pip install -r requirements-gcs.txt; fi

COPY hattention ./hattention
COPY lm1b ./lm1b
COPY gin ./gin
COPY train.py eval.py sample.py README.md ./
RUN pip install --no-deps -e . \
 && python -c "import hattention, lm1b.train" \
 && if [ "${WITH_TFDS}" = "1" ]; then \
      python -c "import tensorflow_datasets as tfds; tfds.builder('lm1b').url_infos"; fi

ENTRYPOINT ["python", "train.py"]
CMD ["--gin_file", "gin/lm1b_53m.gin", "--workdir", "/workdir"]
