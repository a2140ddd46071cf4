# fetch-ml: a multi-stage build. The build stage runs the same command as README.md and
# .ci/run (`cargo build --release --locked`); the runtime stage is a slim Debian image.
#
#   docker build -t fetch-ml .
#   docker run --rm fetch-ml --task=1 --sentence="Hello world!"
#
# The model is downloaded into the container's Hugging Face cache at $HF_HOME (/hf). Mount a
# host folder there to keep it between runs, or your own cache to reuse it:
#   docker run --rm -v "$HOME/.cache/huggingface:/hf" fetch-ml --task=1 --sentence="Hello world!"
#   docker run --rm -v "$HOME/.cache/huggingface:/hf" fetch-ml --task=1 --offline --sentence="Hi"
# or a local model folder:
#   docker run --rm -v "$PWD/models:/models" fetch-ml --task=1 --model /models/all-MiniLM-L6-v2
#
# As an embedding server (deploy/k8s-serve.yaml runs it on Kubernetes):
#   docker run --rm -p 8080:8080 -v "$PWD/models:/models" fetch-ml --task=serve --host 0.0.0.0 \
#       --model /models/all-MiniLM-L6-v2 --dtype int8

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY data ./data
COPY examples ./examples
COPY assets ./assets
COPY benches ./benches
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/fetch-ml /usr/local/bin/fetch-ml
ENV HF_HOME=/hf
WORKDIR /work
# --task=serve's default port.
EXPOSE 8080
ENTRYPOINT ["fetch-ml"]
CMD ["--task=1"]
