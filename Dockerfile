# ponder serving image: `ponder serve` on the bundled checkpoint, HTTP :8080, gRPC :50051.
#
#   docker build -t ponder .
#   docker run --rm -p 8080:8080 -p 50051:50051 -v ponder-cache:/var/cache/ponder --stop-timeout 40 ponder
#
# Arguments after the image name are added to `ponder serve` (`--slots 4`,
# `--checkpoint /models/mine`, ...); PONDER_API_KEY turns on bearer auth.
# Other commands: `docker run --entrypoint ponder ponder generate "def f("`.
#
# The build stage installs the project as a wheel would (`pip install .`):
# the bundled checkpoint and the gRPC stubs travel inside the package
# (ponder.checkpoints, ponder.v1), so the runtime stage needs only the virtual environment.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/ponder
# The dependencies in a layer of their own, keyed on pyproject.toml alone, so
# that a code change does not reinstall JAX.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY ponder ponder
COPY model model
COPY train train
COPY server server
COPY clients clients
COPY protos/ponder protos/ponder
COPY checkpoints checkpoints
RUN pip install --no-deps .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it. The
# compile cache is a volume mount point: with it kept, a restart skips most of
# the warm-up compilation.
RUN groupadd --system --gid 10001 ponder \
    && useradd --system --uid 10001 --gid ponder --create-home --home-dir /home/ponder ponder \
    && mkdir -p /var/cache/ponder/jax \
    && chown -R ponder:ponder /var/cache/ponder
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/ponder
EXPOSE 8080 50051
# /health is 503 while the server compiles (about a minute on a cold cache)
# and while it drains; slim has no curl. A changed --port needs this changed too.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["ponder", "serve", "--host", "0.0.0.0", "--compile-cache", "/var/cache/ponder/jax"]
