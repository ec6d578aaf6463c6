# surgeflow: the stream engine image used by docker-compose.yml (services `surgeflow`, `producer`).
#
#   docker build -t surgeflow:local .
#   docker run --rm surgeflow:local --help
#
# No compiler or system library is installed: every native dependency (bytewax, confluent-kafka
# with librdkafka, chdb, hiredis, orjson, river) ships a manylinux wheel that carries its own libs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Dependencies first, read from pyproject.toml alone: this (large) layer is rebuilt only when
# pyproject.toml changes, not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the project itself (a regular, non-editable install into site-packages; the dependencies
# are already satisfied, so this only builds and installs surgeflow). The build tree is removed.
COPY . .
RUN pip install . \
 && cd / && rm -rf /src

# Unprivileged runtime user (fixed uid, so mounted volumes can be chowned predictably).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin surgeflow

WORKDIR /app
# The `config` package (settings.py and its YAML profiles) is installed above; the profiles are also
# kept at /app/config/*.yaml so `--config /app/config/production.yaml` works and a user can mount
# their own file over it. Read-only for the runtime user.
COPY config/*.yaml /app/config/
# Writable state for relative default paths (`.surgeflow/...`: the embedded demo's Redis, chDB
# and output files) when the image runs `surgeflow demo`; `run` keeps its recovery store and
# sink spool in /var/lib/surgeflow (a named volume in docker-compose.yml; owned by the runtime
# user, so a fresh volume inherits it).
RUN mkdir -p /app/.surgeflow /var/lib/surgeflow \
 && chown surgeflow:surgeflow /app/.surgeflow /var/lib/surgeflow

USER surgeflow

# Exec form: surgeflow is PID 1 and receives SIGTERM itself (it drains the flow, then exits).
ENTRYPOINT ["surgeflow"]
CMD ["run", "--config", "/app/config/production.yaml"]
