# The fleet controller: edgekit-fleet[host] (MQTT ingest, rollouts, registry, PostgreSQL),
# installed from this source tree, run as an unprivileged user. Build from the repository
# root:
#   docker build -f docker/controller.Dockerfile -t edgekit-controller .
# docker/controller.toml is the configuration; flags after the image name replace CMD.
FROM python:3.11-slim

COPY pyproject.toml README.md /src/
COPY edgekit /src/edgekit
COPY converters /src/converters
COPY device_agent /src/device_agent
RUN pip install --no-cache-dir "edgekit-fleet[host] @ file:///src" && rm -rf /src \
    && useradd --system --create-home --home-dir /var/lib/edgekit edgekit \
    && install -d -o edgekit -g edgekit /var/lib/edgekit/artifacts
COPY docker/controller.toml /etc/edgekit/controller.toml

USER edgekit
WORKDIR /var/lib/edgekit
EXPOSE 9464
ENTRYPOINT ["edgekit"]
CMD ["controller", "run", "--config", "/etc/edgekit/controller.toml", "--metrics", "0.0.0.0:9464"]
