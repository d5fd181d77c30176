# Training image for Cloud TPU VMs (default) or NVIDIA GPUs (--build-arg ACCELERATOR=cuda12).
#   docker build -t hlm1b .                                  # TPU
#   docker build -t hlm1b-gpu --build-arg ACCELERATOR=cuda12 .  # GPU
# On a TPU VM run with --privileged --net=host so JAX sees the TPU chips and the other hosts.
FROM python:3.11-slim

ARG ACCELERATOR=tpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HLM1B_DATA_ROOT=/data

WORKDIR /app
COPY requirements.txt pyproject.toml ./
RUN python -m pip install --upgrade pip \
 && pip install -r requirements.txt "jax[${ACCELERATOR}]==0.10.2"

COPY hattention ./hattention
COPY lm1b ./lm1b
COPY gin ./gin
COPY train.py eval.py sample.py README.md ./
RUN pip install --no-deps -e . \
 && python -c "import hattention, lm1b.train"

ENTRYPOINT ["python", "train.py"]
CMD ["--gin_file", "gin/lm1b_53m.gin", "--workdir", "/workdir"]
