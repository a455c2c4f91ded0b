# firehose-zmq in one container: `firehose-cluster` (an edge and the config's workers).
#   docker build -t firehose-zmq .
#   docker run --rm -p 7474:7474 -p 7477:7477 -v firehose-data:/var/lib/firehose-zmq firehose-zmq
# Every setting comes from the environment (FIREHOSE_<SECTION>_<KEY>, see
# `firehose-edge --print-config`) or from a config mounted at /etc/firehose-zmq/cluster.toml
# and named with `--config`. For one process per container, run `firehose-edge` or
# `firehose-worker --id w1` as the command instead, with the same config everywhere.
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md LICENSE ./
COPY firehose_zmq ./firehose_zmq
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --home-dir /var/lib/firehose-zmq firehose \
    && mkdir -p /var/lib/firehose-zmq && chown firehose /var/lib/firehose-zmq
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER firehose
WORKDIR /var/lib/firehose-zmq
# Listen on every interface inside the container; publish only what you need.
ENV FIREHOSE_EDGE_HOST=0.0.0.0 \
    FIREHOSE_EDGE_NATIVE_PUB_BIND=tcp://0.0.0.0:7475 \
    FIREHOSE_EDGE_NATIVE_ROUTER_BIND=tcp://0.0.0.0:7476 \
    FIREHOSE_ADMIN_BIND=0.0.0.0:7477 \
    FIREHOSE_STORAGE_DATA_DIR=/var/lib/firehose-zmq
EXPOSE 7474 7475 7476 7477
VOLUME /var/lib/firehose-zmq
HEALTHCHECK --interval=10s --timeout=2s CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:7477/readyz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["firehose-cluster"]
CMD ["--log-format", "json"]
