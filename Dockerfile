# CPU image: `docker run --rm -v $PWD:/work logitcache teacher --model /work/teacher ...`
# (The GPU/vLLM image comes with the scale-out work.)
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# The CPU build of torch keeps the image small (the default wheel brings CUDA libraries).
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/logitcache
COPY pyproject.toml README.md ./
COPY logitcache ./logitcache
RUN pip install .

WORKDIR /work
ENTRYPOINT ["logitcache"]
CMD ["--help"]
