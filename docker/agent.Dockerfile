# The device agent: edgekit-fleet[agent] (onnxruntime, LiteRT, MQTT), installed from this
# source tree, run as an unprivileged user. Build from the repository root:
#   docker build -f docker/agent.Dockerfile -t edgekit-agent .
# Configure it with EDGEKIT_<SECTION>_<KEY> variables (docs/devices.md), e.g.
#   docker run -e EDGEKIT_DEVICE_ID=dev-1 -e EDGEKIT_MQTT_BROKER=mqtt://broker:1883 \
#       -v ./keys:/etc/edgekit:ro edgekit-agent
FROM python:3.11-slim

COPY pyproject.toml README.md /src/
COPY edgekit /src/edgekit
COPY converters /src/converters
COPY device_agent /src/device_agent
RUN pip install --no-cache-dir "edgekit-fleet[agent] @ file:///src" && rm -rf /src \
    && useradd --system --create-home --home-dir /var/lib/edgekit-agent edgekit-agent \
    && install -d -o edgekit-agent -g edgekit-agent /var/lib/edgekit-agent/models

ENV EDGEKIT_MODEL_DIR=/var/lib/edgekit-agent/models \
    EDGEKIT_MODEL_TRUSTED_KEYS=/etc/edgekit/signing.pub \
    EDGEKIT_HTTP_LISTEN=0.0.0.0:8080
USER edgekit-agent
WORKDIR /var/lib/edgekit-agent
EXPOSE 8080
ENTRYPOINT ["edgekit-agent"]
CMD ["run"]
