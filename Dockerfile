# Reproduces the seed experiment anywhere. The build stage installs what .ci/run
# installs, builds and runs the tests (scripts/test.sh, shared with CI); the runtime
# stage carries only the programs, OpenBLAS and the CUDA runtime libraries. Its
# default command trains the pair, correlates it and writes the report into /out:
#   docker build -t univ .
#   docker run --gpus all -v "$PWD/out:/out" univ     # out/seed/correlation/report.html
ARG CUDA_IMAGE=13.0.0
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_IMAGE}-devel-${UBUNTU} AS build
WORKDIR /src
COPY . .
RUN scripts/test.sh \
 && install -d /opt/univ/bin \
 && install build/train_pair build/correlate scripts/seed_experiment.sh /opt/univ/bin/

FROM nvidia/cuda:${CUDA_IMAGE}-runtime-${UBUNTU}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libopenblas0-openmp libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/univ/bin/ /usr/local/bin/
VOLUME /out
CMD ["seed_experiment.sh", "/out/seed"]
