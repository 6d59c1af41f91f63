# ponder runtime image. The server and the bundled default checkpoint arrive in
# later issues; for now the image runs `ponder` (generate / init / convert).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ponder_cli.py ./
COPY model model
COPY train train
COPY server server
COPY clients clients
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --create-home ponder
USER ponder
WORKDIR /home/ponder
ENTRYPOINT ["ponder"]
CMD ["--help"]
