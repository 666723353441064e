# rectrain image: the same entrypoint as on a workstation.
#   docker build -t rectrain .                                   (CPU: fbgemm-gpu-cpu)
#   docker build --build-arg FBGEMM=fbgemm-gpu -t rectrain:cuda . (CUDA: use a CUDA torch index too)
#   docker run --rm -v $PWD/outputs:/app/outputs rectrain                       # default job
#   docker run --rm rectrain torchrun --nproc_per_node=2 -m app.train sharding=row_wise
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG FBGEMM=fbgemm-gpu-cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# Same order and pins as `make setup`: torch first, then torchrec without its (CUDA-only)
# metadata dependencies, then everything else constrained to that torch.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX} \
 && echo "torch==2.13.0" > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt ${FBGEMM}==1.8.0 \
 && pip install --no-deps torchrec==1.8.0

COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install -c /tmp/constraints.txt .
COPY configs ./configs
COPY scripts ./scripts

CMD ["python", "-m", "app.train"]
