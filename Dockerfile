# kvcompact-server image, two variants from this one file:
#   CPU backend:   docker build -t kvcompact:0.1.0 .
#   CUDA backend:  docker build -t kvcompact:0.1.0-cuda \
#                    --build-arg BUILD_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04 \
#                    --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 \
#                    --build-arg CUDA_ARCHITECTURES="80;90" .
# The build stage runs the same install script as CI (scripts/install-deps.sh), so the two agree;
# the runtime stage gets the binaries, the shared libraries they link that the base image lacks,
# and the budget profiles. Every flag is an environment variable KVCOMPACT_<FLAG>.
ARG BUILD_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim

FROM ${BUILD_IMAGE} AS build
ARG CUDA_ARCHITECTURES=90
COPY scripts/install-deps.sh /src/scripts/install-deps.sh
RUN /src/scripts/install-deps.sh --build-only && rm -rf /var/lib/apt/lists/*
COPY . /src
WORKDIR /src
RUN scripts/build.sh -DKVCOMPACT_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
 && mkdir -p /out/bin /out/lib /out/profiles \
 && cp build/server/kvcompact-server build/client/kvcompact /out/bin/ \
 && cp profiles/*.json /out/profiles/ \
 && ldd build/server/kvcompact-server build/client/kvcompact | awk '/=> \//{print $3}' | sort -u \
    | grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so|/libcuda\.so|/usr/local/cuda' \
    | xargs -I{} cp -L {} /out/lib/

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/lib/ /opt/kvcompact/lib/
COPY --from=build /out/profiles/ /usr/share/kvcompact/profiles/
# The CUDA runtime image brings cuBLAS and cuSOLVER under /usr/local/cuda; the driver comes from
# the node (NVIDIA container toolkit).
ENV LD_LIBRARY_PATH=/opt/kvcompact/lib:/usr/local/cuda/lib64 \
    KVCOMPACT_LISTEN=0.0.0.0:50051 \
    KVCOMPACT_HEALTH_LISTEN=0.0.0.0:8081 \
    KVCOMPACT_METRICS_LISTEN=0.0.0.0:9464 \
    KVCOMPACT_PROFILES_DIR=/usr/share/kvcompact/profiles
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kvcompact
USER 10001:10001
EXPOSE 50051 8081 9464
HEALTHCHECK --interval=10s --timeout=3s CMD ["kvcompact", "health", "--server=127.0.0.1:8081"]
ENTRYPOINT ["kvcompact-server"]
