# kvcompact-server image (CPU backend). Build: docker build -t kvcompact:0.1.0 .
# The build stage runs the same install script as CI (scripts/install-deps.sh), so the two agree.
FROM debian:12 AS build
COPY scripts/install-deps.sh /src/scripts/install-deps.sh
RUN /src/scripts/install-deps.sh
COPY . /src
WORKDIR /src
RUN scripts/build.sh -DKVCOMPACT_BUILD_TESTS=OFF \
 && mkdir -p /out/bin /out/lib \
 && cp build/server/kvcompact-server build/client/kvcompact /out/bin/ \
 && ldd build/server/kvcompact-server build/client/kvcompact | awk '/=> \//{print $3}' | sort -u \
    | grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' | xargs -I{} cp -L {} /out/lib/

FROM debian:12-slim
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/lib/ /opt/kvcompact/lib/
ENV LD_LIBRARY_PATH=/opt/kvcompact/lib \
    KVCOMPACT_LISTEN=0.0.0.0:50051 \
    KVCOMPACT_METRICS_LISTEN=0.0.0.0:9464
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin kvcompact
USER 10001
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s CMD ["kvcompact", "health", "--server=127.0.0.1:50051"]
ENTRYPOINT ["kvcompact-server"]
