# pat-users: the gRPC UserService, runtime only (no dev tools, no embedded PostgreSQL).
# Build: docker build -t pat-users .   Run: see docker-compose.yml or deploy/k8s/.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it (see deploy/k8s).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies first, pinned, so code changes reuse this layer.
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
COPY generated/ generated/
RUN pip install --constraint constraints.txt . \
    && rm -rf build *.egg-info

# Migrations. ALEMBIC_CONFIG (below) points `alembic` and the service at them.
COPY alembic.ini ./
COPY alembic/ alembic/

USER 10001:10001

# One server process per container (WORKERS=1): replicas, not workers, scale it.
ENV GRPC_PORT=50051 \
    WORKERS=1 \
    ALEMBIC_CONFIG=/app/alembic.ini
EXPOSE 50051

# grpc.health.v1.Health/Check for the whole server; exit 0 only when SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "service.probe"]

# Needs DATABASE_URL; run `alembic upgrade head` first (compose's command and
# the Kubernetes initContainer do).
CMD ["python", "-m", "service"]
