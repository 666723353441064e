# rectrain image: the same entrypoint as on a workstation.
#   docker build -t rectrain .                                  (CPU: torch +cpu, fbgemm-gpu-cpu)
#   docker build --build-arg CUDA=cu130 -t rectrain:cuda .      (CUDA 13.0: torch and fbgemm-gpu, both from
#                                                                that CUDA index of PyTorch's wheels)
#   docker run --rm -v $PWD/outputs:/app/outputs rectrain                       # default job
#   docker run --rm rectrain torchrun --nproc_per_node=2 -m app.train sharding=row_wise
#   docker run --rm --gpus all rectrain:cuda torchrun --nproc_per_node=gpu -m app.train
FROM python:3.11-slim

# cpu, or the CUDA variant of PyTorch's wheel index to install torch and fbgemm-gpu from: cu130 (the
# CUDA of torch 2.13's default wheels; NVIDIA driver 580 or newer), or another download.pytorch.org/whl/
# index that carries both torch 2.13.0 and fbgemm-gpu 1.8.0 (an older CUDA for an older driver).
ARG CUDA=cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# Same order and pins as `make setup`: torch first, then fbgemm constrained to that torch, then
# torchrec without its (CUDA-only) metadata dependencies, then everything else constrained to that
# torch. The CUDA fbgemm comes from torch's own index, built for the same CUDA as that torch
# (PyPI's fbgemm-gpu is built for one CUDA only, which need not be this torch's); its one
# dependency, numpy, is mirrored there. The last line fails the build on a torch of the wrong kind.
RUN index="https://download.pytorch.org/whl/${CUDA}" \
 && pip install torch==2.13.0 --index-url "${index}" \
 && echo "torch==2.13.0" > /tmp/constraints.txt \
 && if [ "${CUDA}" = cpu ]; then \
        pip install -c /tmp/constraints.txt fbgemm-gpu-cpu==1.8.0; \
    else \
        pip install -c /tmp/constraints.txt fbgemm-gpu==1.8.0 --index-url "${index}"; \
    fi \
 && pip install --no-deps torchrec==1.8.0 \
 && python -c "import sys, torch; cuda = torch.version.cuda; \
sys.exit(None if (cuda is None) == ('${CUDA}' == 'cpu') else f'torch {torch.__version__} is not the ${CUDA} build')"

COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install -c /tmp/constraints.txt .
COPY configs ./configs
COPY scripts ./scripts

CMD ["python", "-m", "app.train"]
