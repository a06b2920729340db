# The esker CLI in a static, distroless image (docker-compose.yml runs it as
# "esker node"; .dockerignore keeps .git and local data out of the context).
#   docker build -t esker .
#   docker run --rm esker help
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/esker ./cmd/esker \
	&& mkdir -p /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/esker /usr/local/bin/esker
# An empty /data owned by the nonroot user, so that a fresh named volume
# mounted there is writable.
COPY --from=build --chown=65532:65532 /out/data /data
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/esker"]
CMD ["help"]
