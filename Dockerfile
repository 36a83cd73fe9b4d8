# kvcompact-server image, two variants from this one file:
#   CPU backend:   docker build -t kvcompact:0.1.0 .
#   CUDA backend:  docker build -t kvcompact:0.1.0-cuda \
#                    --build-arg BUILD_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04 \
#                    --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 \
#                    --build-arg CUDA_ARCHITECTURES="80;90" .
# The build stage runs the same install script as CI (scripts/install-deps.sh), so the two agree;
# the runtime stage installs the distribution packages of the shared libraries the binaries link
# (scripts/runtime-packages.sh lists them; build and runtime images are the same distribution),
# then gets the binaries and the budget profiles. Every flag is an environment variable
# KVCOMPACT_<FLAG>.
ARG BUILD_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim

FROM ${BUILD_IMAGE} AS build
ARG CUDA_ARCHITECTURES=90
COPY scripts/install-deps.sh /src/scripts/install-deps.sh
RUN /src/scripts/install-deps.sh --build-only && rm -rf /var/lib/apt/lists/*
COPY . /src
WORKDIR /src
RUN scripts/build.sh -DKVCOMPACT_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
 && mkdir -p /out/bin /out/profiles \
 && cp build/server/kvcompact-server build/client/kvcompact /out/bin/ \
 && cp profiles/*.json /out/profiles/ \
 && scripts/runtime-packages.sh /out/bin/kvcompact-server /out/bin/kvcompact > /out/runtime-packages

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/runtime-packages /tmp/runtime-packages
RUN apt-get update \
 && xargs -a /tmp/runtime-packages apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/profiles/ /usr/share/kvcompact/profiles/
# The CUDA runtime image brings cuBLAS and cuSOLVER under /usr/local/cuda; the driver comes from
# the node (NVIDIA container toolkit).
ENV LD_LIBRARY_PATH=/usr/local/cuda/lib64 \
    KVCOMPACT_LISTEN=0.0.0.0:50051 \
    KVCOMPACT_HEALTH_LISTEN=0.0.0.0:8081 \
    KVCOMPACT_METRICS_LISTEN=0.0.0.0:9464 \
    KVCOMPACT_PROFILES_DIR=/usr/share/kvcompact/profiles
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kvcompact
USER 10001:10001
EXPOSE 50051 8081 9464
HEALTHCHECK --interval=10s --timeout=3s CMD ["kvcompact", "health", "--server=127.0.0.1:8081"]
ENTRYPOINT ["kvcompact-server"]
