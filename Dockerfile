# Builds univ in the CUDA 13.0 development image, runs the tests, and by default
# trains the seed experiment's pair into the mounted /out:
#   docker build -t univ .
#   docker run --gpus all -v "$PWD/runs:/out" univ
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04
WORKDIR /univ
COPY . .
RUN scripts/test.sh
CMD ["build/train_pair", "--out", "/out/seed", "--overwrite"]
